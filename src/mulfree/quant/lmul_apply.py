"""Run a Hugging Face causal LM with L-Mul (or simulated bf16 / fp8) products in its attention
(Q·Kᵀ and softmax·V, through transformers' attention-function registry) and/or its linear layers.

Every product mode keeps float32 accumulation; only how each scalar product is formed changes:
- fp32: exact fp32 products (the reference);
- bf16: operands rounded to bfloat16 (RNE), exact products;
- fp8_e4m3 / fp8_e5m2: operands scaled per tensor so |max| maps to the format's largest finite value,
  rounded to fp8, exact products, scales re-applied (standard fp8 practice; unscaled e4m3 would flush
  most weights, which are ~1e-2);
- lmulK: L-Mul with operands rounded to K mantissa bits and l(K) (lmul23 = full float32 operands,
  lmul7 = bf16 operands), computed by the `_cpu` kernel (`mulfree.kernels.lmul`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ATTN_NAME = "mulfree_lmul"
WHERE = ("attention", "linear", "all")
_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Product:
    """How the scalar products of a matmul are formed: mode in fp32|bf16|fp8_e4m3|fp8_e5m2|lmul."""

    mode: str
    mantissa_bits: int | None = None

    @classmethod
    def parse(cls, name: str) -> "Product":
        """'fp32', 'bf16', 'fp8_e4m3', 'fp8_e5m2' or 'lmulK' (K = 1..23 mantissa bits)."""
        m = re.fullmatch(r"lmul(\d+)", name)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= 23:
                raise ValueError(f"{name}: L-Mul mantissa bits must be in 1..23")
            return cls("lmul", k)
        if name in ("fp32", "bf16", *_FP8):
            return cls(name)
        raise ValueError(f"unknown product mode {name!r}; use fp32, bf16, fp8_e4m3, fp8_e5m2 or lmulK (e.g. lmul3)")

    @property
    def name(self) -> str:
        return f"lmul{self.mantissa_bits}" if self.mode == "lmul" else self.mode


def _fp8_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x scaled per tensor into the fp8 range, rounded to fp8, scaled back (float32)."""
    x = x.float()
    scale = x.abs().amax().clamp(min=1e-30) / torch.finfo(dtype).max
    return (x / scale).to(dtype).float() * scale


def matmul(a: torch.Tensor, b: torch.Tensor, product: Product) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] with `product`'s scalar products and float32 accumulation."""
    if product.mode == "fp32":
        return a.float() @ b.float()
    if product.mode == "bf16":
        return a.to(torch.bfloat16).float() @ b.to(torch.bfloat16).float()
    if product.mode in _FP8:
        return _fp8_round(a, _FP8[product.mode]) @ _fp8_round(b, _FP8[product.mode])
    from mulfree.kernels.lmul import lmul_matmul

    k = product.mantissa_bits
    return lmul_matmul(a.float(), b.float(), mantissa_bits=None if k == 23 else k)


class ProductLinear(nn.Module):
    """nn.Linear whose y = x Wᵀ + b uses `product` for the scalar products (inference only)."""

    def __init__(self, linear: nn.Linear, product: Product):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.product = product
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x.reshape(-1, self.in_features), self.weight.detach().t(), self.product)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, product={self.product.name}"


def product_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with Q·Kᵀ and softmax·V formed by `module.mulfree_product` (registered as
    `mulfree_lmul` in transformers' AttentionInterface). Shapes: query [B, H, T, D], key/value [B, Hkv, S, D]."""
    from transformers.models.llama.modeling_llama import repeat_kv

    product: Product = module.mulfree_product
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = matmul(query, key.transpose(2, 3), product) * scaling  # [B, H, T, S]
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = matmul(probs, value, product).to(query.dtype)  # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), probs


def register_attention() -> None:
    """Register `mulfree_lmul` with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_NAME, product_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, eager_mask)


def apply_products(model: nn.Module, product: Product, where: str, include_head: bool = False) -> dict[str, int]:
    """Make `model` (an HF causal LM, in place) use `product` in attention and/or linear layers.

    `where` is attention | linear | all; the lm_head stays exact unless `include_head`.
    Returns counts of replaced attention modules and linear layers.
    """
    if where not in WHERE:
        raise ValueError(f"where must be one of {', '.join(WHERE)}; got {where!r}")
    counts = {"attention": 0, "linear": 0}
    if where in ("attention", "all"):
        register_attention()
        for module in model.modules():
            if hasattr(module, "num_key_value_groups") and hasattr(module, "scaling"):
                module.mulfree_product = product
                counts["attention"] += 1
        if not counts["attention"]:
            raise ValueError("no attention modules with num_key_value_groups/scaling found (Llama-style HF model needed)")
        model.set_attn_implementation(ATTN_NAME)
    if where in ("linear", "all"):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and (include_head or child is not head):
                    setattr(parent, name, ProductLinear(child, product))
                    counts["linear"] += 1
    return counts
