"""Next-token selection from logits: greedy (temperature 0), temperature, top-k and nucleus (top-p).

Shared by the torch generation loop and the packed engine so both draw the same tokens for a seed.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf. logits [B, V] -> [B, V] (a new tensor); the reference
    that `sample_row`'s candidates are tested against.

    top-p keeps the smallest set of most likely tokens whose probability sums to at least `top_p`
    (the most likely token always stays).
    """
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of logits [..., V] (the first on ties, a NaN where a row has one), as
    `argmax(-1)`, through torch's max reduction: several times faster than argmax's on the CPU, where the greedy
    pick of a batched decode step is otherwise a few % of the step (docs/packed.md)."""
    return logits.max(dim=-1).indices


def _nucleus(probs: torch.Tensor, top_p: float) -> int:
    """How many of the sorted (descending) `probs` the top-p set keeps: a token is dropped once the mass before
    it reaches top_p (the most likely token always stays); len(probs) when they do not reach top_p."""
    before = probs.cumsum(0) - probs
    return max(1, int((before < top_p).sum()))


def sample_row(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> int:
    """One token from logits [V]: the distribution of `filter_logits` (top-k, then top-p of what is left),
    drawn by inverse CDF with one uniform from `generator`.

    Never sorts the whole vocabulary unless the nucleus is wider than a few hundred tokens: top-k and top-p
    work on `torch.topk` candidates, plain temperature on the cumulative sum (multinomial and a full sort cost
    1-4 ms per 32k-row, as much as a decode step of several sequences)."""
    if temperature == 0:
        return int(greedy(logits))
    z = logits.float() / temperature
    vocab = z.numel()
    if top_k is not None and 0 < top_k < vocab:
        vals, idx = torch.topk(z, top_k)
        probs = vals.softmax(0)
    elif top_p is not None and 0.0 < top_p < 1.0:
        full = z.softmax(0)
        k = min(vocab, 256)
        while True:  # widen the candidates until their mass reaches top_p (or they are the whole vocabulary)
            probs, idx = torch.topk(full, k)
            if k == vocab or float(probs.sum()) >= top_p:
                break
            k = min(vocab, 4 * k)
    else:
        cdf = z.softmax(0).cumsum(0)
        u = torch.rand(1, generator=generator) * cdf[-1]
        return min(int(torch.searchsorted(cdf, u, right=True)), vocab - 1)
    if top_p is not None and 0.0 < top_p < 1.0:
        probs = probs[: _nucleus(probs, top_p)]
    cdf = probs.cumsum(0)
    u = torch.rand(1, generator=generator) * cdf[-1]
    return int(idx[min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)])


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits [B, V] -> LongTensor [B]; argmax when temperature == 0."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return greedy(logits.float())
    rows = [sample_row(row, temperature, top_k, top_p, generator) for row in logits]
    return torch.tensor(rows, dtype=torch.long, device=logits.device)
