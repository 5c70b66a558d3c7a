"""Quantized linear layers that replace `nn.Linear` (and GPT-2 `Conv1D`) after PTQ: y = x W̃ᵀ + b.

`UniformLinear` holds integer codes (RTN / GPTQ); `ShiftAddLinear` holds BCQ bit planes packed as
bits and APoT scale exponents/signs as int8 (format in `ops/bcq.py`). Latency-mode ShiftAdd layers
(col_group 8) run every input outside autograd through the LUT kernels (`kernels/shiftadd.py`: the
GEMV for one token, the GEMM for any batch) and never build a dense weight. Accuracy-mode layers
(col_group 1: one α per column, so a key's 8 columns do not share a scale and the LUT cannot be
scaled as a whole), uniform layers and grad-enabled forwards use the dense weight rebuilt once from
the stored codes. A layer quantized with incoherence processing
(`ops/hadamard.py`) stores W'' = U W T⁻¹ in the rotated basis: the LUT kernels apply T (`rht`) to
the input first and U⁻¹ (`rht_out`) to the output before the bias; the dense weight has both folded
in (U⁻¹ W̃'' T: one matmul per batch, no online transforms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.kernels import kernel_threads
from mulfree.ops.bcq import bcq_dequantize
from mulfree.ops.hadamard import RandomHadamard


class _QuantLinear(nn.Module):
    """Shared parts: shapes, optional bias, and a cached dense weight for batched inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None
        self.rht: RandomHadamard | None = None  # input transform x -> T x, when quantized incoherently
        self.rht_out: RandomHadamard | None = None  # output transform U (y = U⁻¹ y'')

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 W̃ [out, in] (in the rotated basis when `rht` is set)."""
        raise NotImplementedError

    def weight_dense(self) -> torch.Tensor:
        """The dense fp32 weight of the whole layer in the original basis, U⁻¹ W̃ T with incoherence processing (so
        a batched forward is one matmul, without the two online transforms), made once and cached."""
        if self._dense is None:
            w = self.dequantize()
            if self.rht is not None:  # rows w -> w T
                w = self.rht.fold_input(w)
            if self.rht_out is not None:  # columns m -> U⁻¹ m
                w = self.rht_out.invert_output(w.T).T.contiguous()
            self._dense = w
        return self._dense

    def drop_dense(self) -> None:
        """Free the cached dense weight (the quantizer does, between the calibration passes that use it)."""
        self._dense = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_dense().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class UniformLinear(_QuantLinear):
    """Integer-grid weights: W̃ = (codes − zero) · scale per (row, group of input columns)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group: int):
        super().__init__(in_features, out_features, bias)
        self.bits, self.group = bits, group
        ng = math.ceil(in_features / group)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, ng))
        self.register_buffer("zero", torch.zeros(out_features, ng))

    def dequantize(self) -> torch.Tensor:
        s = self.scale.repeat_interleave(self.group, 1)[:, : self.in_features]
        z = self.zero.repeat_interleave(self.group, 1)[:, : self.in_features]
        return (self.codes.float() - z) * s


class ShiftAddLinear(_QuantLinear):
    """BCQ weights W̃ = Σ_i α_i ∘ b_i, α APoT per (g rows × col_group columns); see `ops/bcq.py`."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group: int, col_group: int, terms: int
    ):
        super().__init__(in_features, out_features, bias)
        self.bits, self.group, self.col_group, self.terms = bits, group, col_group, terms
        kc, ng = math.ceil(in_features / col_group), math.ceil(out_features / group)
        self.register_buffer("planes", torch.zeros(bits, out_features, math.ceil(in_features / 8), dtype=torch.uint8))
        self.register_buffer("exps", torch.zeros(kc, ng, bits, terms, dtype=torch.int8))
        self.register_buffer("signs", torch.zeros(kc, ng, bits, terms, dtype=torch.int8))
        self._kernel_weights = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_weights = None
        super()._load_from_state_dict(*args, **kwargs)

    def dequantize(self) -> torch.Tensor:
        return bcq_dequantize(
            self.planes, self.exps, self.signs, self.out_features, self.in_features, self.group, self.col_group
        )

    def kernel_weights(self):
        """The LUT kernels' weight layout (`kernels.shiftadd.prepare`), made on first use (Latency mode)."""
        from mulfree.kernels import shiftadd as kernel

        if self._kernel_weights is None:
            w = kernel.prepare(self.planes, self.exps, self.signs, self.out_features, self.group)
            w.attach_layer(self.rht, self.rht_out, self.bias)
            self._kernel_weights = w
        return self._kernel_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.col_group != 8 or torch.is_grad_enabled():
            return super().forward(x)
        from mulfree.kernels import shiftadd as kernel

        x2 = x.reshape(-1, self.in_features)  # [T, K], any leading dims
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        y = kernel.forward(x2, self.kernel_weights(), threads=kernel_threads())
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)


def build_qlinear(meta: dict) -> _QuantLinear:
    """An empty quantized layer from its saved description (`meta` from `describe`)."""
    common = (meta["in_features"], meta["out_features"], meta["bias"])
    if meta["kind"] == "uniform":
        layer: _QuantLinear = UniformLinear(*common, bits=meta["bits"], group=meta["group"])
    elif meta["kind"] == "shiftadd":
        layer = ShiftAddLinear(
            *common, bits=meta["bits"], group=meta["group"], col_group=meta["col_group"], terms=meta["terms"]
        )
    else:
        raise ValueError(f"unknown quantized layer kind {meta['kind']!r}")
    layer.rht = _transform(meta.get("incoherence"), meta["in_features"])
    layer.rht_out = _transform(meta.get("incoherence_out"), meta["out_features"])
    return layer


def _transform(inc: dict | None, dim: int) -> RandomHadamard | None:
    """Rebuild a stored incoherence transform ({transform, block, seed}) of width `dim`."""
    if inc is None:
        return None
    if inc["transform"] != "hadamard":
        raise ValueError(f"unknown incoherence transform {inc['transform']!r}")
    rht = RandomHadamard(dim, inc["seed"])
    if rht.block != inc["block"]:
        raise ValueError(f"Hadamard block {inc['block']} does not match width {dim}")
    return rht


def describe(layer: _QuantLinear) -> dict:
    """The JSON-able description `build_qlinear` rebuilds the layer from."""
    meta = {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "bits": layer.bits,
        "group": layer.group,
    }
    if isinstance(layer, ShiftAddLinear):
        meta.update(kind="shiftadd", col_group=layer.col_group, terms=layer.terms)
    else:
        meta.update(kind="uniform")
    if layer.rht is not None:
        meta["incoherence"] = layer.rht.meta()
    if layer.rht_out is not None:
        meta["incoherence_out"] = layer.rht_out.meta()
    return meta
