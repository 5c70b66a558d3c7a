"""transformers' quantizer for `mulfree quantize` dirs: after `import mulfree`,
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds the quantized layers and gives the logits of `load_quantized(dir)`.

A dir's config.json names the quantizer in `quantization_config` (`hf_quantization_config`):
{"quant_method": "mulfree", "method": "rtn" | "gptq" | "shiftadd", "settings": {the method's settings},
"layers": {module path: layer description (`qlinear.describe`)}}. transformers builds the model on the meta device;
before its weights load, `MulfreeHfQuantizer` checks the description (`quant.schema`) and the dir's checksums and
swaps each listed linear for the empty `qlinear.build_qlinear` layer, so the stored codes, scales and bit planes load
by name like any other tensor. Their float buffers stay fp32 whatever `dtype` is asked for (the dense weight is cast
per call, as `load_quantized` does). After loading, the values are checked as `load_quantized` checks them.

Importing this module registers both with transformers (`register`); `import mulfree` imports it as soon as
transformers' quantizer registry is imported.

Example:
    import mulfree
    model = transformers.AutoModelForCausalLM.from_pretrained("out/llama-gptq3")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from mulfree.errors import CheckpointError
from mulfree.models.pretrained import verify_manifest
from mulfree.models.schema import FIX, Rule, check_fields, show
from mulfree.quant.base import linear_weight
from mulfree.quant.qlinear import build_qlinear
from mulfree.quant.schema import METHOD_RULES, check_layer_target, check_values, validate_quant_config

__all__ = ["QUANT_METHOD", "MulfreeHfQuantizer", "MulfreeQuantConfig", "hf_quantization_config", "register"]

QUANT_METHOD = "mulfree"
SOURCE = "quantization_config"  # how errors name the config.json entry


def hf_quantization_config(cfg: dict) -> dict:
    """The `quantization_config` entry for a config.json as `walker.save_quantized` writes it (HF config plus
    `quant_method` and `mulfree_quant`): the method, its settings and the per-layer descriptions."""
    quant = cfg["mulfree_quant"]
    settings = {k: v for k, v in quant.items() if k != "layers"}
    return {"quant_method": QUANT_METHOD, "method": cfg["quant_method"], "settings": settings, "layers": quant["layers"]}


class MulfreeQuantConfig(QuantizationConfigMixin):
    """The parsed `quantization_config` of a quantized dir, checked on construction (CheckpointError naming the field).

    Args:
        method: the PTQ method that wrote the dir ("rtn", "gptq" or "shiftadd").
        settings: its settings as `mulfree quantize` records them (bits, group_size, solver and calibration options).
        layers: {module path: layer description} of every quantized linear.
        **kwargs: `quant_method` (always "mulfree") and fields a later mulfree may add; ignored.
    """

    def __init__(self, method: str | None = None, settings: dict | None = None, layers: dict | None = None,
                 **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.method, self.settings, self.layers = method, settings, layers
        check_fields({"method": method}, {"method": Rule("str", choices=tuple(METHOD_RULES))}, SOURCE)
        check_fields(settings, METHOD_RULES[method], f"{SOURCE} (settings)")
        if not isinstance(layers, dict) or not layers:
            raise CheckpointError(f"{SOURCE}: field 'layers' must be a JSON object of layer descriptions, "
                                  f"got {show(layers)}", FIX)
        validate_quant_config({"quant_method": method, "mulfree_quant": {**settings, "layers": layers}}, SOURCE)


class MulfreeHfQuantizer(HfQuantizer):
    """Loads pre-quantized mulfree dirs (quantizing happens in `mulfree quantize`); inference only, any device."""

    requires_calibration = True
    quantization_config: MulfreeQuantConfig

    def _process_model_before_weight_loading(self, model: torch.nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        """Verify the dir's checksums, then replace every described linear by its empty quantized layer, on the
        linear's device (meta while transformers builds the model), once its tensors are known to be in the
        checkpoint (transformers would fill a missing one with uninitialised memory and only warn)."""
        files = [Path(f) for f in checkpoint_files or []]
        if files:
            verify_manifest(files[0].parent)
        stored = _tensor_names(files)
        for name, meta in self.quantization_config.layers.items():
            check_layer_target(model, name, meta, SOURCE)
            device = linear_weight(model.get_submodule(name)).device
            with torch.device("cpu"):  # the incoherence signs are drawn by a CPU generator
                try:
                    layer = build_qlinear(meta)
                except (ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{SOURCE}: layer {show(name)}: {exc}", FIX) from None
            missing = [f"{name}.{key}" for key in layer.state_dict() if f"{name}.{key}" not in stored]
            if files and missing:
                raise CheckpointError(f"the checkpoint in {files[0].parent} has no {missing[0]}",
                                      "re-run `mulfree quantize`")
            parent, child = get_module_from_name(model, name)
            setattr(parent, child, layer.to(device=device, dtype=torch.float32))

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        """The loaded codes lie inside 2^bits and every float is finite (`schema.check_values`)."""
        check_values(model, self.quantization_config.layers, "the checkpoint")

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _tensor_names(files: list[Path]) -> set[str]:
    """The tensor names stored in safetensors `files`, read from their headers."""
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    return names


def register() -> None:
    """Register the config and quantizer with transformers under "mulfree" (again is a no-op)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not MulfreeQuantConfig:
        register_quantization_config(QUANT_METHOD)(MulfreeQuantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not MulfreeHfQuantizer:
        register_quantizer(QUANT_METHOD)(MulfreeHfQuantizer)


register()
