"""Arithmetic energy per token: count multiplies/additions by number format for a model's shapes under
one arithmetic, and convert them with 45 nm energy-per-op figures.

Energy per op (pJ), Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 0.9 V), the table that
L-Mul (arXiv 2410.00907) and ShiftAddLLM (arXiv 2406.05981, Tab. 1) both use; shift and LUT figures are
ShiftAddLLM Tab. 1 (same 45 nm node). bf16 uses the fp16 figures (same multiplier width class).
Only arithmetic is counted: no memory traffic, no control; nonlinear functions (exp, sigmoid, SiLU,
rsqrt) are counted under `nonlinear` and not converted (no figure in the table).

Arithmetics (how one multiply-accumulate of a weight matmul is done):
- fp32: fp32 mul + fp32 add.              - bf16: bf16 mul + fp32 add (fp32 accumulator).
- int8: int8 mul + int32 add, plus one fp32 mul per input (quantize) and per output (dequantize).
- ternary: one int32 add (weights in {-1,0,1}; zeros counted as adds, dense worst case), plus the
  int8 quantize/dequantize fp32 muls as for int8.
- shiftadd: ShiftAddLLM BCQ with `bits` binary planes: per 8 inputs one 256-entry LUT (8 + 255 fp16
  adds), per output/plane/8 inputs one LUT query + one fp16 add; per output/plane/group of 128 inputs
  3 int16 shifts + 3 fp16 adds (APoT scale with 3 power-of-two terms).
- lmul: one L-Mul (one int32 add) + one fp32 add; every other multiply is an L-Mul too.
Attention products (Q·Kᵀ, softmax·V) and element-wise multiplies use the arithmetic's float format
(fp32 for fp32; L-Mul for lmul; bf16 otherwise). Attention is counted for the token at position
`context` (it attends to `context` keys).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mulfree.models import registry

ENERGY_PJ: dict[str, float] = {
    "fp32_mul": 3.7,
    "fp32_add": 0.9,
    "fp16_mul": 1.1,
    "fp16_add": 0.4,
    "int32_mul": 3.1,
    "int32_add": 0.1,
    "int8_mul": 0.2,
    "int8_add": 0.03,
    "int16_shift": 0.057,
    "lut8_query": 0.37,
}

ARITHS = ("fp32", "bf16", "int8", "ternary", "shiftadd", "lmul")

# (multiply, add) used for activation products and element-wise ops under each arithmetic
_FLOAT_OPS = {
    "fp32": ("fp32_mul", "fp32_add"),
    "lmul": ("int32_add", "fp32_add"),
}
_BF16_OPS = ("fp16_mul", "fp16_add")


def _shape(model_or_config: Any) -> dict[str, Any]:
    """Shape fields from one of our configs/models, or an HF (Llama-style) config/model."""
    cfg = getattr(model_or_config, "config", model_or_config)
    get = cfg.get if isinstance(cfg, dict) else lambda k, default=None: getattr(cfg, k, default)
    model_type = get("model_type")
    d, layers = get("hidden_size"), get("num_hidden_layers")
    if d is None or layers is None or get("vocab_size") is None or get("intermediate_size") is None:
        raise ValueError("count_ops needs a config with hidden_size, num_hidden_layers, intermediate_size, vocab_size")
    family = registry.find(cfg)
    shape = {"family": family.name if family else model_type, "recurrent": bool(family and family.recurrent),
             "d": d, "layers": layers, "vocab": get("vocab_size"), "inter": get("intermediate_size"),
             "model_type": model_type}
    if shape["recurrent"]:
        shape["lower_bound"] = bool(get("use_lower_bound", True))
    else:
        heads = get("num_attention_heads")
        if heads is None:
            raise ValueError(f"model_type {model_type!r}: a transformer config needs num_attention_heads")
        head_dim = get("head_dim") or d // heads
        shape.update(heads=heads, kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim)
    return shape


class _Counts:
    """Accumulates per-token op counts, split into weight matmuls and everything else."""

    def __init__(self, arith: str, shiftadd_bits: int):
        self.arith = arith
        self.bits = shiftadd_bits
        self.mul, self.add = _FLOAT_OPS.get(arith, _BF16_OPS)
        self.weights: Counter = Counter()
        self.other: Counter = Counter()
        self.macs = Counter()

    def linear(self, n_in: int, n_out: int) -> None:
        """One weight matmul y[n_out] = W x[n_in] for one token."""
        w, macs = self.weights, n_in * n_out
        self.macs["weights"] += macs
        if self.arith == "fp32":
            w["fp32_mul"] += macs
            w["fp32_add"] += macs
        elif self.arith == "bf16":
            w["fp16_mul"] += macs
            w["fp32_add"] += macs
        elif self.arith == "lmul":
            w["int32_add"] += macs
            w["fp32_add"] += macs
        elif self.arith in ("int8", "ternary"):
            if self.arith == "int8":
                w["int8_mul"] += macs
            w["int32_add"] += macs
            w["fp32_mul"] += n_in + n_out  # quantize inputs, dequantize outputs
        elif self.arith == "shiftadd":
            luts = -(-n_in // 8)
            groups = -(-n_in // 128)
            w["fp16_add"] += luts * (8 + 255) + n_out * self.bits * (luts + 3 * groups)
            w["lut8_query"] += n_out * self.bits * luts
            w["int16_shift"] += n_out * self.bits * groups * 3
        else:
            raise ValueError(f"unknown arith {self.arith!r}; use one of {', '.join(ARITHS)}")

    def products(self, n: int) -> None:
        """n activation-activation multiply-accumulates (attention)."""
        self.macs["attention"] += n
        self.other[self.mul] += n
        self.other["fp32_add"] += n  # fp32 accumulator

    def elementwise(self, muls: int = 0, adds: int = 0, nonlinear: int = 0) -> None:
        self.other[self.mul] += muls
        self.other[self.add] += adds
        self.other["nonlinear"] += nonlinear

    def rmsnorm(self, n: int, gated: bool = False) -> None:
        # sum of squares (n mul, n add), scale by rsqrt and by the weight (2n mul), one rsqrt
        self.elementwise(muls=3 * n + (n if gated else 0), adds=n, nonlinear=1 + (n if gated else 0))


def count_ops(
    model_or_config: Any, arith: str, context: int = 2048, shiftadd_bits: int = 3, include_head: bool = True
) -> dict[str, Any]:
    """Per-token op counts and arithmetic energy of a model under one arithmetic.

    Args:
        model_or_config: an MMfree / Transformer++ config or model, or an HF Llama-style config/model
            (a dict with the same fields also works).
        arith: fp32 | bf16 | int8 | ternary | shiftadd | lmul (see the module docstring).
        context: position of the counted token (attention reads `context` keys).
        shiftadd_bits: binary planes per weight for `shiftadd`.
        include_head: count the lm_head matmul.
    Returns:
        {"arith", "family", "context", "macs": {"weights", "attention"}, "ops": {name: count},
         "energy_pj": {"weights", "other", "total"}, "energy_table": ENERGY_PJ}
    Example: count_ops(MMFreeConfig.from_preset("370m"), "ternary")["energy_pj"]["total"]
    """
    if arith not in ARITHS:
        raise ValueError(f"unknown arith {arith!r}; use one of {', '.join(ARITHS)}")
    s = _shape(model_or_config)
    c = _Counts(arith, shiftadd_bits)
    d, inter = s["d"], s["inter"]
    for _ in range(s["layers"]):
        if s["recurrent"]:
            c.rmsnorm(d)  # attn_norm
            for _proj in range(4):  # i, f, g, o: BitLinear d -> d, each with its own RMSNorm
                c.rmsnorm(d)
                c.linear(d, d)
            # f = σ(.), lower bound f = lb + (1 - lb) f, i = SiLU(.) (1 - f), h = f h + i, o = g_norm(h) SiLU(g)
            c.elementwise(muls=3 * d + (d if s["lower_bound"] else 0),
                          adds=2 * d + (2 * d if s["lower_bound"] else 0), nonlinear=2 * d)
            c.rmsnorm(d, gated=True)
            c.rmsnorm(d)  # mlp_norm
            c.rmsnorm(d)  # gate_proj's norm
            c.linear(d, 2 * inter)
            c.elementwise(muls=inter, nonlinear=inter)  # SiLU(gate) * up
            c.rmsnorm(inter)  # down_proj's norm
            c.linear(inter, d)
        else:
            hd, heads, kv = s["head_dim"], s["heads"], s["kv_heads"]
            c.rmsnorm(d)
            c.linear(d, heads * hd)
            c.linear(d, kv * hd)
            c.linear(d, kv * hd)
            c.elementwise(muls=2 * (heads + kv) * hd, adds=(heads + kv) * hd)  # RoPE
            c.products(2 * context * heads * hd)  # Q·Kᵀ and softmax·V
            # scale scores, softmax: exp, sum, multiply by the reciprocal
            c.elementwise(muls=2 * context * heads, adds=context * heads, nonlinear=context * heads + heads)
            c.linear(heads * hd, d)
            c.rmsnorm(d)
            c.linear(d, inter)
            c.linear(d, inter)
            c.elementwise(muls=inter, nonlinear=inter)  # SiLU(gate) * up
            c.linear(inter, d)
        c.elementwise(adds=2 * d)  # residuals
    c.rmsnorm(d)
    if include_head:
        c.linear(d, s["vocab"])
    ops = c.weights + c.other
    e_w = sum(ENERGY_PJ[k] * v for k, v in c.weights.items())
    e_o = sum(ENERGY_PJ[k] * v for k, v in c.other.items() if k in ENERGY_PJ)
    return {
        "arith": arith,
        "family": s["family"],
        "model_type": s["model_type"],
        "context": context,
        "macs": dict(c.macs),
        "ops": dict(sorted(ops.items())),
        "energy_pj": {"weights": e_w, "other": e_o, "total": e_w + e_o},
        "energy_table": dict(ENERGY_PJ),
    }
