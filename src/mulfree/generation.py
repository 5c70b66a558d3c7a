"""Autoregressive generation with the torch models: one parallel prefill, then one token at a time
through the returned state (MMfree recurrent state: O(1) per token; Transformer++ KV cache)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mulfree.errors import MulfreeError
from mulfree.models import registry
from mulfree.ops.sampling import sample_next
from mulfree.settings import GenerationConfig, check_max_new_tokens


def check_lengths(limit: int | None, prompt_len: int, max_new_tokens: int) -> None:
    """Raise a one-line error for an empty prompt, a negative token count, or prompt + new > `limit`."""
    check_max_new_tokens(max_new_tokens)
    if prompt_len == 0:
        raise MulfreeError("the prompt is empty", "pass some text with --prompt")
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise MulfreeError(
            f"prompt ({prompt_len} tokens) + max new tokens ({max_new_tokens}) exceeds the model's "
            f"limit of {limit} tokens",
            "shorten the prompt or lower --max-new-tokens",
        )


def context_limit(model: torch.nn.Module) -> int | None:
    """Longest prompt + generation the model accepts: `max_position_embeddings` for position-encoded
    models, None (no limit) for recurrent ones, whose state does not grow with the sequence."""
    family = registry.find(model)
    if family is not None and family.recurrent:
        return None
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Extend `input_ids` ([T] or [B, T] long) by up to `max_new_tokens`; returns [B, T + n].

    Greedy when temperature == 0, otherwise sampling with a generator seeded by `seed`. `callback`
    receives each new token id of row 0 as soon as it is chosen (for streaming). Generation stops
    early when every row has produced `eos_token_id`.
    """
    GenerationConfig(max_new_tokens, temperature, top_k, top_p, 0 if seed is None else seed)  # one-line errors
    ids = input_ids.long()
    if ids.dim() == 1:
        ids = ids[None]
    check_lengths(context_limit(model), ids.shape[1], max_new_tokens)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    out = [ids]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    step_input, state = ids, None
    for _ in range(max_new_tokens):
        logits, state = model(step_input, state=state)
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        out.append(token[:, None])
        if callback is not None:
            callback(int(token[0]))
        if finished.all():
            break
        step_input = token[:, None]
    model.train(was_training)
    return torch.cat(out, dim=1)


class TextStreamer:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 byte sequences."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed :])
        self.printed = len(text)

    def flush(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        self.write(text[self.printed :])
        self.printed = len(text)
