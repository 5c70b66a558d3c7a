"""Shared builders of the test suite (not collected: no test_ prefix)."""

from __future__ import annotations

import torch

from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM


def random_mmfree(hidden: int, intermediate: int, layers: int = 3, **extra) -> MMFreeForCausalLM:
    """A seeded tiny MMfree model moved away from its init (lower bounds and norms random), so that every
    parameter changes the output."""
    torch.manual_seed(0)
    cfg = MMFreeConfig(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                       **extra)
    m = MMFreeForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.lower_bounds.normal_()
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m
