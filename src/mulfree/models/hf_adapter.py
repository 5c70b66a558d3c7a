"""Any Hugging Face causal LM (plain, or with layers swapped by `mulfree quantize`) behind our model
interface, `logits, state = model(input_ids, state, positions, key_mask)`, so that generation, perplexity,
lm-eval and the server's batched KV decode (`infer.kv_batch`) run it exactly as they run our Transformer++.

The state is our `KVCache`: one (k, v) [B, H_kv, T, Dh] per layer. Each call copies it into a transformers
`DynamicCache`, runs the model with explicit `position_ids` (0-based; OPT adds its offset of 2 itself, GPT-2
reads them from its learned position table) and a 2-D `attention_mask`, and reads the grown (k, v) back.
"""

from __future__ import annotations

import torch
from torch import nn

from mulfree.errors import ConfigError
from mulfree.models.transformer import KVCache, step_positions


class HFCausalLM(nn.Module):
    """A transformers causal LM in our interface; `.config` is the wrapped model's config.

    Example:
        >>> model, tok = load_hf_causal_lm("smollm2")
        >>> logits, cache = HFCausalLM(model)(torch.tensor([[1, 2, 3]]))
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.config = model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        state: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids [B, T] -> (logits [B, T, V] fp32, KV cache of (k, v) [B, H_kv, past + T, Dh] per layer).

        positions: int64 [B, T] per-row positions; None: past .. past + T for every row.
        key_mask: bool [B, past + T], False marks a padding key (left padding); None: every key is real.
        """
        from transformers import DynamicCache

        B, T = input_ids.shape
        past, positions = step_positions(input_ids, state, positions)
        if key_mask is None:
            key_mask = torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device)
        cache = DynamicCache() if state is None else DynamicCache(ddp_cache_data=state)
        out = self.hf(input_ids=input_ids, attention_mask=key_mask.long(), position_ids=positions,
                      past_key_values=cache, use_cache=True)
        layers = getattr(out.past_key_values, "layers", [None])
        if not all(hasattr(layer, "keys") for layer in layers):  # e.g. a state-space model's cache
            raise ConfigError(f"model_type {self.config.model_type!r} keeps no key/value cache",
                              "use a decoder-only transformer (Llama, OPT, GPT-2, ...)")
        return out.logits.float(), [(layer.keys, layer.values) for layer in layers]
