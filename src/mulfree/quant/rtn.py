"""Round-to-nearest (RTN) baseline: the uniform per-(row, group) grid of GPTQ without compensation."""

from __future__ import annotations

import torch

from mulfree.quant.base import QuantMethod
from mulfree.quant.gptq import UniformQuantizer
from mulfree.quant.qlinear import UniformLinear


class RTN(QuantMethod):
    """RTN as a walker method: needs no calibration data."""

    name = "rtn"
    needs_stats = False

    def __init__(self, bits: int, group: int = 128):
        self.bits, self.group = bits, group

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group}

    def quantize(
        self, w: torch.Tensor, h: torch.Tensor | None, bias: torch.Tensor | None, bits: int | None = None
    ) -> UniformLinear:
        n, k = w.shape
        bits = bits or self.bits
        group = k if self.group <= 0 else min(self.group, k)
        uq = UniformQuantizer(w, bits, group)
        uq.quantize_all(w)
        layer = UniformLinear(k, n, bias is not None, bits, group)
        layer.load_state_dict({**uq.state(), **({"bias": bias} if bias is not None else {})})
        return layer
