"""Hugging Face transformers integration for the MatMul-free LM: config/model wrappers registered with
the Auto classes, and a `RecurrentCache` so `generate()` (greedy, sampling, beams, left padding) carries the
MLGRU state instead of a KV cache. Importing this module registers `model_type = "mmfree"`:

    import mulfree.models.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(mulfree_model_dir)

The wrapper owns the same `model.*` / `lm_head.*` modules as `MMFreeForCausalLM`, so directories written by
`save_model` and by `save_pretrained` hold identical tensors. `generate()` has no position limit (the model has
no positions), stops at the tokenizer's `<|endoftext|>` and pads with it, also for dirs saved without a
generation config. A packed dir (`mulfree pack`) is refused with a pointer to `PackedModel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from mulfree.data.text import EOS_TOKEN, TOKENIZER_FILE, eos_token_id, load_tokenizer
from mulfree.errors import CheckpointError, MulfreeError
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
        if "format" in kwargs:  # a packed dir's config: its weights are trits + scales, not BitLinear weights
            raise CheckpointError(
                f"this config.json describes a packed mulfree model (format {kwargs['format']!r}), which transformers "
                "cannot run", "load it with mulfree.infer.engine.PackedModel.load(dir), or pass the unpacked model dir")
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
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> MMFreeHFForCausalLM:
        """As transformers loads it, plus eos/pad from the dir's `<|endoftext|>` when no generation config names them."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        path = Path(str(pretrained_model_name_or_path)) / TOKENIZER_FILE
        if path.is_file():
            with contextlib.suppress(MulfreeError):
                set_generation_tokens(model, load_tokenizer(path))
        return model

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate without its `max_position_embeddings` cap: the recurrence has no positions."""
        with _no_position_limit(self.config):
            return super().generate(*args, **kwargs)

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


@contextlib.contextmanager
def _no_position_limit(config: MMFreeHFConfig) -> Iterator[None]:
    """Hide `max_position_embeddings` (transformers caps default lengths at it and warns past it) for one call."""
    saved = config.max_position_embeddings
    config.max_position_embeddings = None
    try:
        yield
    finally:
        config.max_position_embeddings = saved


def set_generation_tokens(model: MMFreeHFForCausalLM, tokenizer: Any) -> None:
    """Make generate() stop at and pad with the tokenizer's `<|endoftext|>` where the generation config names none."""
    eos = eos_token_id(tokenizer)
    gen = model.generation_config
    if gen.eos_token_id is None and eos is not None:
        gen.eos_token_id = eos
    if gen.pad_token_id is None and gen.eos_token_id is not None:
        first = gen.eos_token_id if isinstance(gen.eos_token_id, int) else next(iter(gen.eos_token_id))
        gen.pad_token_id = first


def to_hf(model: MMFreeForCausalLM, tokenizer: Any = None) -> MMFreeHFForCausalLM:
    """Wrap trained weights of our model in the transformers class (shares no storage); with our tokenizer,
    generate() stops at and pads with its `<|endoftext|>`."""
    hf = MMFreeHFForCausalLM(MMFreeHFConfig(**dataclasses.asdict(model.config)))
    hf.load_state_dict(model.state_dict())
    if tokenizer is not None:
        set_generation_tokens(hf, tokenizer)
    return hf.eval()


class MMFreeTokenizerFast(PreTrainedTokenizerFast):
    """Our byte-level BPE for dirs saved without `tokenizer_config.json`: `<|endoftext|>` is eos and pad, padding left."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> PreTrainedTokenizerFast:
        tok = super().from_pretrained(*args, **kwargs)  # no __init__ here: transformers then keeps tokenizer.json whole
        if EOS_TOKEN in tok.get_vocab():
            tok.eos_token = tok.pad_token = EOS_TOKEN
            tok.padding_side = "left"
        return tok


AutoConfig.register(MMFreeHFConfig.model_type, MMFreeHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MMFreeHFConfig, MMFreeHFForCausalLM, exist_ok=True)
AutoTokenizer.register(MMFreeHFConfig, fast_tokenizer_class=MMFreeTokenizerFast, exist_ok=True)
