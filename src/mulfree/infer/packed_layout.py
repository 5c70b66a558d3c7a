"""The packed model's tensor layout, read from the torch `MMFreeForCausalLM` itself (module names and shapes),
the packing of a state dict into it, its validation, and the pure-torch reference leaves (`PackedReferenceLinear`,
`PackedReferenceNorm`) that let the `nn/` model walk run on packed weights as the engine's reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mulfree.errors import CheckpointError
from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.norm import RMSNorm
from mulfree.ops import fused
from mulfree.ops.pack import FORMAT, packed_format, ternarize

# The one table of a block's weights: module of MMFreeBlock (model.layers.N.<module>) -> field of the engine's
# `Layer`. Packing, validation, the engine and the reference walk all follow it and the torch model's own module
# names and shapes, so a change to the block touches this table (and the engine's Layer) only.
LAYER_FIELDS = {
    "attn_norm": "attn_norm",
    "attn.i_proj": "i_proj",
    "attn.f_proj": "f_proj",
    "attn.g_proj": "g_proj",
    "attn.o_proj": "o_proj",
    "attn.g_norm": "g_norm",
    "mlp_norm": "mlp_norm",
    "mlp.gate_proj": "gate_proj",
    "mlp.down_proj": "down_proj",
}


class SkipInit(TorchFunctionMode):
    """Skips the `torch.nn.init` initializers while a shapes-only model is built (on the meta device the first
    `normal_` imports torch's decompositions: ~1.5 s for values nobody reads)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def skeleton(cfg: dict[str, Any]) -> MMFreeForCausalLM:
    """The torch model of `cfg` on the meta device: module names and shapes, no memory, no values."""
    fields = {f.name for f in dataclasses.fields(MMFreeConfig)}
    with torch.device("meta"), SkipInit():
        return MMFreeForCausalLM(MMFreeConfig(**{k: v for k, v in cfg.items() if k in fields}))


def layout(cfg: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]]]:
    """The packed tensors of `cfg`, from the torch model's parameters: (every BitLinear -> (N, K), every other
    tensor -> shape). A BitLinear's latent weight becomes `<name>.packed` + `<name>.scale`; the lower bounds
    become `model.lb`, already the per-layer vectors; every other parameter keeps its name and shape."""
    model = skeleton(cfg)
    linears = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, BitLinear)}
    block = {name for name, m in model.model.layers[0].named_modules() if isinstance(m, (BitLinear, RMSNorm))}
    block -= {name + ".norm" for name in block}  # a BitLinear's own input norm
    if block != set(LAYER_FIELDS):
        raise RuntimeError(f"LAYER_FIELDS does not match MMFreeBlock's modules {sorted(block)}")
    shapes: dict[str, tuple[int, ...]] = {"model.lb": (cfg["num_hidden_layers"], cfg["hidden_size"])}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in linears:
            shapes[owner + ".scale"] = (1,)
        elif name != "model.lower_bounds":
            shapes[name] = tuple(p.shape)
    return linears, shapes


def linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Every BitLinear of `cfg`'s model: name -> (N, K)."""
    return layout(cfg)[0]


def pack_state_dict(cfg: dict[str, Any], state: dict[str, torch.Tensor], fmt: str = FORMAT) -> dict[str, torch.Tensor]:
    """Turn an MMfree state dict (official key names) into packed tensors: trits + original scale per linear, the
    trits in packed format `fmt` (`mulfree.ops.pack.packed_format`)."""
    pack = packed_format(fmt).pack
    if cfg.get("output_gate", "official") != "official":
        raise CheckpointError(f"output_gate {cfg['output_gate']!r} is not supported by the packed engine",
                              "pack a model trained with the official output gate")
    linears, shapes = layout(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, (n, k) in linears.items():
        w = state[name + ".weight"]
        if tuple(w.shape) != (n, k):
            raise CheckpointError(f"{name}.weight has shape {tuple(w.shape)}, the config expects {(n, k)}",
                                  "check that config.json belongs to these weights")
        t, scale = ternarize(w)
        out[name + ".packed"] = pack(t)
        out[name + ".scale"] = torch.tensor([scale], dtype=torch.float32)
    if cfg.get("use_lower_bound", True):
        p = state["model.lower_bounds"].float().softmax(dim=0)
        out["model.lb"] = (p.cumsum(dim=0) - p[0]).contiguous()
    else:
        out["model.lb"] = torch.zeros(shapes["model.lb"])
    for name in shapes:  # norms and the embedding, in fp32 (a bf16 embedding stays bf16)
        if name not in out:
            v = state[name]
            keep = name == "model.embeddings.weight" and v.dtype == torch.bfloat16
            out[name] = (v if keep else v.float()).contiguous()
    return out


def validate_tensors(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], source: str, fmt: str = FORMAT) -> None:
    """CheckpointError unless `tensors` holds every tensor of `cfg`'s packed model with its shape, the packed
    weights as uint8 in the shapes of format `fmt`."""
    f = packed_format(fmt)
    linears, expect = layout(cfg)
    expect.update({name + ".packed": f.packed_shape(n, k) for name, (n, k) in linears.items()})
    missing = sorted(set(expect) - set(tensors))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors (e.g. {missing[0]})",
                              "re-pack the model with `mulfree pack`")
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != tuple(shape):
            what = f" of format {f.name}" if name.endswith(".packed") else ""
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the config{what} "
                                  f"expects {tuple(shape)}", "check that config.json belongs to these weights")
    for name in linears:
        if tensors[name + ".packed"].dtype != torch.uint8:
            raise CheckpointError(f"{source}: {name}.packed is {tensors[name + '.packed'].dtype}, not uint8",
                                  "re-pack the model with `mulfree pack`")


def repack(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """The packed tensors of format `src` in format `dst`: the same trits and scales (lossless either way)."""
    a, b = packed_format(src), packed_format(dst)
    if a.name == b.name:
        return tensors
    out = dict(tensors)
    for name, (n, k) in linear_shapes(cfg).items():
        out[name + ".packed"] = b.pack(a.unpack(tensors[name + ".packed"], (n, k)))
    return out


class PackedReferenceLinear(nn.Module):
    """A BitLinear on packed weights (format `fmt`) with the engine's integer math: rmsnorm_quant_ref, then the
    exact int64 dot with the unpacked trits, then (s_x * s_w). x [..., K] -> [..., N] fp32."""

    def __init__(self, packed: torch.Tensor, n: int, k: int, scale: torch.Tensor, norm_weight: torch.Tensor,
                 eps: float, fmt: str = FORMAT):
        super().__init__()
        self.register_buffer("trits", packed_format(fmt).unpack(packed, (n, k)).to(torch.int64))
        self.register_buffer("scale", scale)
        self.register_buffer("norm_weight", norm_weight)
        self.eps = eps
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, a_scale, _ = fused.rmsnorm_quant_ref(x, self.norm_weight, self.eps)
        return (q[..., :self.k].to(torch.int64) @ self.trits.T).float() * (a_scale[..., None] * self.scale)


class PackedReferenceNorm(RMSNorm):
    """RMSNorm with the engine's rounding: the fp32 factor from a float64 mean (ops.fused.rmsnorm_ref)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rmsnorm_ref(x, self.weight, self.eps)


