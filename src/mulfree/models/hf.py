"""Hugging Face transformers integration for the MatMul-free LM: config/model wrappers registered with
the Auto classes, and a `RecurrentCache` so `generate()` (greedy, sampling, beams, left padding) carries the
MLGRU state instead of a KV cache. Importing this module registers `model_type = "mmfree"`:

    import mulfree.models.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(mulfree_model_dir)

The wrapper owns the same `model.*` / `lm_head.*` modules as `MMFreeForCausalLM`, so directories written by
`save_model` and by `save_pretrained` hold identical tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from mulfree.models.mmfree import MMFreeConfig, MMFreeForCausalLM


class RecurrentStateLayer(CacheLayerMixin):
    """One MLGRU layer's cache: the fp32 state h [B, D] and how many tokens it has absorbed."""

    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: torch.Tensor | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("MLGRU layers keep a recurrent state, not keys and values")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise TypeError("a recurrent state cannot be cropped (it does not store past tokens)")


class RecurrentCache(Cache):
    """Per-layer MLGRU states, in the form `generate()` expects of `past_key_values`."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[RecurrentStateLayer() for _ in range(num_layers)])

    def states(self) -> list[torch.Tensor] | None:
        if self.layers[0].state is None:
            return None
        return [layer.state for layer in self.layers]

    def advance(self, states: list[torch.Tensor], num_tokens: int) -> None:
        for layer, state in zip(self.layers, states):
            layer.state = state
            layer.seen += num_tokens


class MMFreeHFConfig(PretrainedConfig):
    model_type = MMFreeConfig.model_type

    def __init__(self, **kwargs: Any) -> None:
        fields = {f.name for f in dataclasses.fields(MMFreeConfig)}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        core = MMFreeConfig(**own)
        for name, value in dataclasses.asdict(core).items():
            if name not in ("bos_token_id", "eos_token_id"):
                setattr(self, name, value)
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(bos_token_id=core.bos_token_id, eos_token_id=core.eos_token_id, **kwargs)

    def to_mulfree(self) -> MMFreeConfig:
        fields = {f.name for f in dataclasses.fields(MMFreeConfig)}
        return MMFreeConfig(**{k: getattr(self, k) for k in fields})


class MMFreeHFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MMFreeHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["MMFreeBlock"]

    def __init__(self, config: MMFreeHFConfig) -> None:
        super().__init__(config)
        core = MMFreeForCausalLM(config.to_mulfree())
        self.model = core.model
        self.lm_head = core.lm_head
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights are initialized by `MMFreeForCausalLM.reset_parameters` (the official scheme)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a KV cache: forward creates a RecurrentCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RecurrentCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("MMFreeHFForCausalLM needs input_ids (inputs_embeds is not supported)")
        T = input_ids.shape[1]
        mask = None
        if attention_mask is not None and not bool(attention_mask[:, -T:].all()):
            mask = attention_mask[:, -T:].bool()
        state = past_key_values.states() if isinstance(past_key_values, RecurrentCache) else None
        hidden, new_state = self.model(input_ids, state, mask)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache:
            if not isinstance(past_key_values, RecurrentCache):
                past_key_values = RecurrentCache(len(new_state))
            past_key_values.advance(new_state, T)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)


def to_hf(model: MMFreeForCausalLM) -> MMFreeHFForCausalLM:
    """Wrap trained weights of our model in the transformers class (shares no storage)."""
    hf = MMFreeHFForCausalLM(MMFreeHFConfig(**dataclasses.asdict(model.config)))
    hf.load_state_dict(model.state_dict())
    return hf.eval()


AutoConfig.register(MMFreeHFConfig.model_type, MMFreeHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MMFreeHFConfig, MMFreeHFForCausalLM, exist_ok=True)
