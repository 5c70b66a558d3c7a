"""The schema of a quantized model dir's config.json (`mulfree quantize`): `quant_method`, the method's settings
and one layer description per quantized linear (`qlinear.describe`), checked for types, ranges and
cross-field rules before anything is built; then each layer against the model it replaces a linear of, and
the loaded buffers against their description. Every failure is one CheckpointError naming the file and field.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mulfree.errors import CheckpointError
from mulfree.models.schema import FIX, MAX_INTERMEDIATE, MAX_SEED, Rule, check_fields, show
from mulfree.quant.base import is_linear, linear_weight
from mulfree.quant.config import BITS_RANGE

MAX_LAYERS = 1 << 17
GROUP = Rule("int", -1, MAX_INTERMEDIATE)  # -1 = a whole row / column
INCOHERENCE = ("none", "hadamard", "hadamard-out", "hadamard-io")
_SOLVER = {"blocksize": Rule("int", 1, 1 << 16), "percdamp": Rule("float", 0.0, 1.0),
           "incoherence": Rule("str", choices=INCOHERENCE), "incoherence_seed": Rule("int", 0, MAX_SEED)}
METHOD_RULES: dict[str, dict[str, Rule]] = {
    name: {"bits": Rule("int", *BITS_RANGE[name]), "group_size": GROUP, **({} if name == "rtn" else _SOLVER)}
    for name in BITS_RANGE
}
METHOD_RULES["shiftadd"].update(mode=Rule("str", choices=("acc", "lat")), rounds=Rule("int", 0, 10_000),
                                apot_terms=Rule("int", 1, 4), mixed_bits=Rule("float", 1.0, 5.0, optional=True))
WIDTH = Rule("int", 1, MAX_INTERMEDIATE)
LAYER_RULES = {"kind": Rule("str", choices=("uniform", "shiftadd")), "in_features": WIDTH, "out_features": WIDTH,
               "bias": Rule("bool"), "bits": Rule("int", 1, 8), "group": WIDTH}
SHIFTADD_RULES = {"col_group": WIDTH, "terms": Rule("int", 1, 4)}
TRANSFORM_RULES = {"transform": Rule("str", choices=("hadamard",)), "block": WIDTH, "seed": Rule("int", 0, MAX_SEED)}


def validate_quant_config(raw: Any, source: str) -> dict[str, dict]:
    """Check the quantization fields of a quantized dir's config.json; returns the per-layer metas."""
    check_fields(raw, {"quant_method": Rule("str", choices=tuple(METHOD_RULES))}, source)
    quant = raw.get("mulfree_quant")
    if not isinstance(quant, dict):
        raise CheckpointError(f"{source}: field 'mulfree_quant' must be a JSON object, got {show(quant)}", FIX)
    method = raw["quant_method"]
    check_fields(quant, METHOD_RULES[method], f"{source} (mulfree_quant)")
    layers = quant.get("layers")
    if not isinstance(layers, dict) or not 1 <= len(layers) <= MAX_LAYERS:
        raise CheckpointError(f"{source}: field 'mulfree_quant.layers' must be a JSON object of 1..{MAX_LAYERS} "
                              f"layer descriptions, got {show(layers)}", FIX)
    for name, meta in layers.items():
        _check_layer(name, meta, method, quant, source)
    return layers


def _check_layer(name: str, meta: Any, method: str, quant: dict, source: str) -> None:
    where = f"{source} (layer {show(name)})"
    check_fields(meta, LAYER_RULES, where)
    expected_kind = "shiftadd" if method == "shiftadd" else "uniform"
    if meta["kind"] != expected_kind:
        raise CheckpointError(f"{where}: kind {meta['kind']!r} does not belong to quant_method {method!r}", FIX)
    if meta["kind"] == "shiftadd":
        check_fields(meta, SHIFTADD_RULES, where)
    bits, top = meta["bits"], quant["bits"]
    allowed = (top, top + 1) if quant.get("mixed_bits") is not None else (top,)
    if bits not in allowed:
        raise CheckpointError(f"{where}: bits {bits} disagrees with the method's bits {top}", FIX)
    if meta["group"] > (meta["in_features"] if meta["kind"] == "uniform" else meta["out_features"]):
        raise CheckpointError(f"{where}: group {meta['group']} is wider than the layer", FIX)
    for key in ("incoherence", "incoherence_out"):
        if meta.get(key) is not None:
            check_fields(meta[key], TRANSFORM_RULES, f"{where} ({key})")


def check_layer_target(model: nn.Module, name: str, meta: dict, source: str) -> None:
    """The layer a description replaces must be a linear of the model with the described shape."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{source}: layer {show(name)} is not a module of the model", FIX) from None
    if not is_linear(module):
        raise CheckpointError(f"{source}: layer {show(name)} is a {type(module).__name__}, not a linear layer", FIX)
    shape = tuple(linear_weight(module).shape)
    if shape != (meta["out_features"], meta["in_features"]):
        raise CheckpointError(f"{source}: layer {show(name)} is described as {meta['out_features']}x{meta['in_features']}"
                              f", the model's linear is {shape[0]}x{shape[1]}", FIX)


def check_values(model: nn.Module, layers: dict[str, dict], source: str) -> None:
    """Loaded tensors agree with the config: integer codes inside 2^bits, every float finite."""
    for name in layers:
        layer = model.get_submodule(name)
        codes = getattr(layer, "codes", None)
        if codes is not None and codes.numel() and int(codes.max()) >= 1 << layer.bits:
            raise CheckpointError(f"{source}: {name}.codes holds {int(codes.max())}, beyond {layer.bits}-bit codes",
                                  "the weights do not belong to this config; re-run `mulfree quantize`")
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values", "re-run `mulfree quantize`")
