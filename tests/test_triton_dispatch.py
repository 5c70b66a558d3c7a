"""The GPU training path of the layers (BitLinear, the MLGRU recurrence) through the Triton kernels, run on the
CPU under TRITON_INTERPRET=1 with the layers told the tensors are on a GPU: a tiny MMfree model's loss and
gradients equal the CPU fused path's."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM
from mulfree.nn import fused


def _loss_and_grads(model, x):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), x.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_triton_training_path_equals_the_cpu_fused_path(monkeypatch):
    torch.manual_seed(0)
    config = MMFreeConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, vocab_size=64)
    model = MMFreeForCausalLM(config)
    x = torch.randint(0, 64, (2, 9))
    cpu_loss, cpu_grads = _loss_and_grads(model, x)
    monkeypatch.setattr(fused, "active", lambda t: False)  # the CPU kernels off,
    monkeypatch.setattr(fused, "_on_gpu", lambda t: True)  # the tensors taken for GPU ones
    calls = []
    for name in ("triton_bitlinear", "triton_recurrence"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    gpu_loss, gpu_grads = _loss_and_grads(model, x)
    assert {"triton_bitlinear", "triton_recurrence"} <= set(calls)
    assert abs(gpu_loss - cpu_loss) < 1e-4
    assert gpu_grads.keys() == cpu_grads.keys()
    for name, g in cpu_grads.items():
        cos = torch.nn.functional.cosine_similarity(gpu_grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.999, name  # the weight scales' sums differ in order: a rare int8 / ternary code flips
