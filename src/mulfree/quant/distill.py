"""End-to-end distillation of a quantized model's float parameters towards the FP model.

After every block is quantized, Adam fits the parameters that stay in floating point (norm weights
and biases of the decoder blocks, the final norm) so that the quantized model's next-token
distribution matches the FP model's on the calibration windows (KL divergence). The quantized
weights are buffers and never change; embeddings and the LM head are left alone. This is
block-wise norm tweaking (`walker._tune_block`) made end to end: errors of all blocks are
corrected together, against the quantity perplexity measures.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm


@contextmanager
def training_only(params: list[nn.Parameter], among: Iterable[nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` alone among `among` (others frozen) inside the block; every flag restored after."""
    among = list(among)
    flags = [p.requires_grad for p in among]
    for p in among:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(among, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def head_inputs(model: nn.Module, calib: torch.Tensor) -> list[torch.Tensor]:
    """What the LM head reads (final hidden states, after the final norm) for each calibration window."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        for row in calib:
            model(row[None], use_cache=False)
    finally:
        handle.remove()
    return captured


def float_parameters(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Parameter]:
    """The distilled parameters: float parameters of the decoder `blocks` and of norm modules outside
    them (the final norm); so never the embeddings or the LM head."""
    params = {id(p): p for p in blocks.parameters() if p.is_floating_point()}
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            params.update({id(p): p for p in module.parameters(recurse=False) if p.is_floating_point()})
    return list(params.values())


@torch.enable_grad()
def distill(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib: torch.Tensor,
    teacher: list[torch.Tensor],
    epochs: int,
    lr: float,
    progress: bool = True,
) -> list[float]:
    """Adam on `float_parameters(model, blocks)` against KL(p_FP ‖ p_model) per token, one step per
    calibration window; p_FP comes from the model's own (unchanged) LM head applied to `teacher`
    (`head_inputs` of the FP model on the same windows). Returns the mean loss of each epoch."""
    params = float_parameters(model, blocks)
    head = model.get_output_embeddings()
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    with training_only(params, model.parameters()):
        for _ in tqdm(range(epochs), desc="distill epochs", disable=not progress):
            total = 0.0
            for row, hidden in zip(calib, teacher):
                with torch.no_grad():
                    target = torch.log_softmax(head(hidden).float(), dim=-1)
                logits = model(row[None], use_cache=False).logits.float()
                loss = torch.nn.functional.kl_div(
                    torch.log_softmax(logits, dim=-1).flatten(0, -2), target.flatten(0, -2),
                    log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
            losses.append(total / len(teacher))
    return losses
