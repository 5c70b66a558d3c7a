"""Power-of-two arithmetic for ShiftAdd: round a scale to a sum of a few signed powers of two
(additive power-of-two, APoT) and multiply by such a scale with exponent shifts only.

A scale α is stored as T terms (sign_t ∈ {-1, 0, +1}, exp_t ∈ int8): α = Σ_t sign_t · 2^exp_t.
The greedy rounding picks exp_t = round(log2 |r_{t-1}|) of the running residual r, and keeps the
sign of every term (the upstream ShiftAddLLM code drops them). A term whose
residual is already zero gets sign 0, so its exponent is irrelevant (stored as 0).
"""

from __future__ import annotations

import torch

EXP_MIN, EXP_MAX = -100, 100


def apot_round(alpha: torch.Tensor, terms: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy APoT rounding of `alpha` (any shape) to `terms` signed powers of two.

    Returns (value fp32 like alpha, exps int8 [..., terms], signs int8 [..., terms]) with
    value == Σ_t signs[..., t] · 2^exps[..., t] exactly.
    """
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    r = alpha.float().clone()
    value = torch.zeros_like(r)
    exps, signs = [], []
    for _ in range(terms):
        # log2(0) = -inf clamps to EXP_MIN, and sign(0) = 0 makes that term vanish.
        e = torch.log2(r.abs()).round_().clamp_(EXP_MIN, EXP_MAX)
        s = torch.sign(r)
        term = torch.ldexp(s, e)
        value += term
        r -= term
        exps.append(e)
        signs.append(s)
    s, e = torch.stack(signs, -1), torch.stack(exps, -1)
    e = torch.where(s == 0, 0.0, e)
    return value, e.to(torch.int8), s.to(torch.int8)


def apot_value(exps: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Decode stored APoT terms [..., T] back to fp32 scales [...]: Σ_t sign_t · 2^exp_t."""
    return (signs.float() * torch.ldexp(torch.ones_like(exps, dtype=torch.float32), exps.float())).sum(-1)


def shift_scale(x: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x · α for an APoT scale α, as exponent shifts and adds: Σ_t sign_t · ldexp(x, exp_t).

    `exps`/`signs` [..., T] broadcast against x[..., None]; no multiplication by α is performed
    (ldexp only changes the exponent field, and the signs select add or subtract).
    """
    shifted = torch.ldexp(x.unsqueeze(-1), exps.float())
    return torch.where(signs > 0, shifted, torch.where(signs < 0, -shifted, torch.zeros_like(shifted))).sum(-1)
