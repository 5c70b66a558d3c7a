"""The MatMul-free language model (Zhu et al. 2024) exactly as the official code computes it.

Embedding (fp) → L × [x + MLGRU(RMSNorm(x)); x + GLU(RMSNorm(x))] → RMSNorm → ternary BitLinear head.
Parameter names match the official `HGRNBitForCausalLM` checkpoints (`model.embeddings.weight`,
`model.layers.N.attn.i_proj.weight`, ...). `forward(ids, state)` runs the parallel scan over the
sequence; passing the returned state back continues the recurrence (one token = O(1) work).

Norm eps as the official code: the block norms, the final norm and the MLGRU's g_norm use `rms_norm_eps`;
every BitLinear's own input norm (projections and lm_head) uses `bitlinear_eps` (the official fused
BitLinear always uses 1e-6). `bitlinear_eps: null` (and configs saved before the field existed) means
`rms_norm_eps`, what mulfree used before, so old model dirs keep their exact outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mulfree.models.config import LMConfig
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.glu import TernaryGLU
from mulfree.nn.mlgru import MASK_MODES, MLGRU, OUTPUT_GATES
from mulfree.nn.norm import RMSNorm

State = list[torch.Tensor]


@dataclasses.dataclass
class MMFreeConfig(LMConfig):
    model_type = "mmfree"
    use_lower_bound: bool = True  # HGRN's learned, layer-wise increasing forget-gate floor
    output_gate: str = "official"  # "official" (checkpoints) or "paper" (σ(g) ⊙ h)
    bitlinear_eps: float | None = None  # eps of every BitLinear's input norm; None: rms_norm_eps (pre-field dirs)
    mask_mode: str = "official"  # padding: "official" zeroes the input gate only; "skip" also freezes the state

    def __post_init__(self) -> None:
        from mulfree.errors import ConfigError

        super().__post_init__()
        if self.output_gate not in OUTPUT_GATES:
            raise ConfigError(f"output_gate must be one of {OUTPUT_GATES}, got {self.output_gate!r}", "fix the config")
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}", "fix the config")
        eps = self.bitlinear_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ConfigError(f"bitlinear_eps must be null or a number in (0, 1), got {eps!r}", "the official value is 1e-6")

    @classmethod
    def preset_extras(cls, hidden_size: int) -> dict[str, Any]:
        return {"bitlinear_eps": OFFICIAL_BITLINEAR_EPS}  # new models: the official BitLinear eps, stated explicitly

    @property
    def bitlinear_norm_eps(self) -> float:
        """The eps every BitLinear's input norm uses."""
        return bitlinear_norm_eps(vars(self))


OFFICIAL_BITLINEAR_EPS = 1e-6  # the official FusedBitLinear's norm eps, whatever the config's rms_norm_eps


def bitlinear_norm_eps(config: dict[str, Any]) -> float:
    """BitLinear input-norm eps of a saved MMfree (or packed) config dict: `bitlinear_eps`, else `rms_norm_eps`."""
    eps = config.get("bitlinear_eps")
    return float(config.get("rms_norm_eps", 1e-6) if eps is None else eps)


class MMFreeBlock(nn.Module):
    def __init__(self, config: MMFreeConfig):
        super().__init__()
        eps, bl_eps = config.rms_norm_eps, config.bitlinear_norm_eps
        self.attn_norm = RMSNorm(config.hidden_size, eps)
        self.attn = MLGRU(config.hidden_size, eps, config.output_gate, bl_eps, config.mask_mode)
        self.mlp_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = TernaryGLU(config.hidden_size, config.intermediate_size, bl_eps)

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None,
        state: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, state = self.attn(x, lower_bound, state, mask, pre_norm=self.attn_norm)
        x = x + mixed
        x = x + self.mlp(x, pre_norm=self.mlp_norm)
        return x, state


class MMFreeModel(nn.Module):
    def __init__(self, config: MMFreeConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MMFreeBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, config.hidden_size))

    def layer_lower_bounds(self) -> torch.Tensor | None:
        """lb [L, D] = cumsum(softmax over layers) − first term: 0 in layer 0, l/L at init."""
        if not hasattr(self, "lower_bounds"):
            return None
        p = self.lower_bounds.float().softmax(dim=0)
        return p.cumsum(dim=0) - p[0]

    def forward(
        self, input_ids: torch.Tensor, state: State | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """input_ids [B, T] -> (final-normed hidden states [B, T, D], state: one fp32 [B, D] per layer)."""
        x = self.embeddings(input_ids)
        lb = self.layer_lower_bounds()
        new_state: State = []
        for layer_idx, layer in enumerate(self.layers):
            x, h = layer(x, None if lb is None else lb[layer_idx], None if state is None else state[layer_idx], mask)
            new_state.append(h)
        return self.norm(x), new_state


class MMFreeForCausalLM(nn.Module):
    def __init__(self, config: MMFreeConfig):
        super().__init__()
        self.config = config
        self.model = MMFreeModel(config)
        self.lm_head = BitLinear(config.hidden_size, config.vocab_size, config.bitlinear_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: token-mixer projections xavier_uniform(gain 2^-2.5), the rest N(0, 0.02)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("lower_bounds"):
                nn.init.zeros_(p)
            elif ".attn." in name and name.endswith("_proj.weight"):
                nn.init.xavier_uniform_(p, gain=2**-2.5)
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self, input_ids: torch.Tensor, state: State | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """input_ids [B, T], mask [B, T] (False = padding) -> (logits [B, T, V] fp32, state: one fp32 [B, D] per layer)."""
        hidden, state = self.model(input_ids, state, mask)
        return self.lm_head(hidden).float(), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

