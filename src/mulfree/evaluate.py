"""Evaluation: perplexity over held-out token streams for our models and Hugging Face models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] from either our models (`(logits, state)`) or HF models (`.logits`)."""
    out = model(input_ids)
    if isinstance(out, tuple):
        return out[0]
    return out.logits


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """exp(mean NLL) of `ids` [N] scored in windows of `window` tokens.

    With `stride` < `window`, windows overlap and only the last `stride` targets of each window are
    scored (sliding-window evaluation, each target counted once); default: non-overlapping windows.
    """
    ids = ids.flatten().long()
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window], got {stride} for window {window}")
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to compute perplexity")
    # Each entry: (start, end, first scored target index within the window).
    spans = []
    for end in range(min(window, ids.numel()), ids.numel() + stride, stride):
        end = min(end, ids.numel())
        start = max(0, end - window)
        first = 1 if not spans else max(1, (end - start) - (end - spans[-1][1]))
        spans.append((start, end, first))
        if end == ids.numel():
            break
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = spans[i : i + batch_size]
        # Windows of one batch share a shape except possibly the last, which is scored alone.
        groups = [batch] if len({(e - s, f) for s, e, f in batch}) == 1 else [[b] for b in batch]
        for group in groups:
            _, _, first = group[0]
            x = torch.stack([ids[s:e] for s, e, _ in group])
            logits = model_logits(model, x).float()
            targets = x[:, first:]
            loss = F.cross_entropy(logits[:, first - 1 : -1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            nll += loss.item()
            count += targets.numel()
    model.train(was_training)
    return math.exp(nll / count)
