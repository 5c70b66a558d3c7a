"""Transformer++ baseline (Llama style: RoPE, SwiGLU, RMSNorm, no bias), sized like the MMfree presets:
the same widths, depths and GLU rule give equal parameter counts (4d² mixer + 3dI channel mixer per layer).

`bitlinear=True` makes it a BitNet-style ternary Transformer: every projection (q, k, v, o, the GLU's gate,
up and down) and the LM head become `mulfree.nn.bitlinear.BitLinear` (own input RMSNorm, int8 activations,
ternary weights), as the MMfree model's are; the embedding stays in floating point. Attention itself
(QKᵀ, softmax, AV) still multiplies, so this is the "ternary projections" control, not a MatMul-free model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.models.config import LMConfig
from mulfree.nn.attention import RotaryAttention
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.norm import RMSNorm

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
RowCaches = list[list[tuple[torch.Tensor, torch.Tensor]]]  # per layer, B rows' own (k, v): see `nn.attention`


def step_positions(input_ids: torch.Tensor, state: KVCache | RowCaches | None, positions: torch.Tensor | None):
    """(past length of `state`, positions [B, T]): the given ones, else past .. past + T for every row. Rows' own
    caches have no common past (0) and need `positions`."""
    rows = state is not None and isinstance(state[0], list)
    if rows and positions is None:
        raise ValueError("rows' own caches need each row's positions")
    past = 0 if state is None or rows else state[0][0].shape[2]
    if positions is None:
        B, T = input_ids.shape
        positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    return past, positions


@dataclasses.dataclass
class TransformerConfig(LMConfig):
    model_type = "transformerpp"
    num_attention_heads: int = 32
    rope_theta: float = 10000.0
    bitlinear: bool = False  # BitNet-style: every projection and the head a ternary BitLinear (see the module doc)

    @classmethod
    def preset_extras(cls, hidden_size: int) -> dict[str, Any]:
        return {"num_attention_heads": max(1, hidden_size // 64)}


def projection(in_features: int, out_features: int, bitlinear: bool = False) -> nn.Module:
    """A bias-free projection: nn.Linear, or the ternary BitLinear for the BitNet-style variant."""
    return BitLinear(in_features, out_features) if bitlinear else nn.Linear(in_features, out_features, bias=False)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bitlinear: bool = False):
        super().__init__()
        self.gate_proj = projection(hidden_size, intermediate_size, bitlinear)
        self.up_proj = projection(hidden_size, intermediate_size, bitlinear)
        self.down_proj = projection(intermediate_size, hidden_size, bitlinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = RotaryAttention(config.hidden_size, config.num_attention_heads, config.rope_theta)
        if config.bitlinear:  # swap the attention's four projections; the attention math is unchanged
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self.attn, name, BitLinear(config.hidden_size, config.hidden_size))
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.bitlinear)

    def forward(self, x, cache, positions=None, key_mask=None):
        mixed, cache = self.attn(self.attn_norm(x), cache, positions, key_mask)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), cache


class TransformerModel(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TransformerForCausalLM(nn.Module):
    rows_kv = True  # takes a list of rows' own caches per layer for a batched decode step (`nn.attention`)

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.model = TransformerModel(config)
        self.lm_head = projection(config.hidden_size, config.vocab_size, config.bitlinear)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere; output projections scaled by 1/sqrt(2L) (GPT-2 style residual init)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / (2 * self.config.num_hidden_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        state: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids [B, T] -> (logits [B, T, V] fp32, KV cache: one (k, v) [B, H, T, Dh] per layer).

        positions (int64 [B, T]) and key_mask (bool [B, past + T], False = padding key) let rows of different
        lengths share a batch (see `RotaryAttention.forward`); None keeps every row at past .. past + T.
        """
        step_positions(input_ids, state, positions)  # refuses rows' own caches without positions
        x = self.model.embeddings(input_ids)
        new_state: KVCache = []
        for layer_idx, layer in enumerate(self.model.layers):
            x, cache = layer(x, None if state is None else state[layer_idx], positions, key_mask)
            new_state.append(cache)
        return self.lm_head(self.model.norm(x)).float(), new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
