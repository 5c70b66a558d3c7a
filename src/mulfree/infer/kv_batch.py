"""Batched decode for KV-cache models (Transformer++) whose sequences have different lengths.

Decoding each sequence alone runs every linear once per sequence on a single token. Here one forward over
[B, 1] runs every linear once over the B tokens, each row at its own RoPE position (its own length), which makes
every row's result the one it would get alone, up to float rounding. Our own forwards (Transformer++, `LlamaLM`:
`rows_kv`) take the rows' caches as they are and grow each in place (`nn.attention.attend_rows`: no cache is
copied); any other model gets them left-padded to the longest, with a key mask that hides the padding (every
row's whole cache copied twice a step: at 8 sequences of 1,300 tokens of SmolLM2-135M that was 70 % of the step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mulfree.models.transformer import KVCache, TransformerForCausalLM


@torch.no_grad()
def decode_kv_batch(
    model: TransformerForCausalLM, tokens: list[int], caches: list[KVCache]
) -> tuple[torch.Tensor, list[KVCache]]:
    """One new token per sequence, all in one forward.

    Args:
        model: a TransformerForCausalLM (or any model taking `positions` and `key_mask` the same way).
        tokens: B token ids, one per sequence.
        caches: B caches, each one (k, v) [1, H, T_i, Dh] per layer; the T_i may differ.

    Returns:
        logits [B, V] fp32 for each sequence's next token, and B new caches of (k, v) [1, H, T_i + 1, Dh].

    Example:
        >>> logits, caches = decode_kv_batch(model, [next_a, next_b], [cache_a, cache_b])
    """
    if len(caches) == 1:  # one sequence: its own cache as it is (no padded copy; a native step can append in place)
        logits, new = model(torch.tensor([tokens], device=caches[0][0][0].device), caches[0])
        return logits[:, -1], [new]
    lengths = [cache[0][0].shape[2] for cache in caches]
    longest = max(lengths)
    device = caches[0][0][0].device
    ids = torch.tensor(tokens, device=device)[:, None]
    n = torch.tensor(lengths, device=device)
    if getattr(model, "rows_kv", False):
        rows = [[cache[layer] for cache in caches] for layer in range(len(caches[0]))]
        logits, new = model(ids, rows, positions=n[:, None])
        return logits[:, -1], [[layer[b] for layer in new] for b in range(len(caches))]

    def left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
        return F.pad(t, (0, 0, longest - n, 0))  # [1, H, n, Dh] -> [1, H, longest, Dh], zeros first

    batched = [
        tuple(torch.cat([left_pad(cache[layer][i], n) for cache, n in zip(caches, lengths)]) for i in (0, 1))
        for layer in range(len(caches[0]))
    ]
    key_mask = torch.arange(longest + 1, device=device) >= (longest - n)[:, None]  # [B, longest + 1]
    logits, new = model(ids, batched, positions=n[:, None], key_mask=key_mask)
    # Row b keeps its last T_b + 1 slots: its own keys and the new one.
    out = [
        [(k[b : b + 1, :, longest - t :], v[b : b + 1, :, longest - t :]) for k, v in new]
        for b, t in enumerate(lengths)
    ]
    return logits[:, -1], out
