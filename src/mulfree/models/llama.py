"""A Llama-architecture Hugging Face model (plain, or with linears swapped by `mulfree quantize`) run by our
own forward, in the `HFCausalLM` interface: `logits, state = model(input_ids, state, positions, key_mask)`.
Mistral and Qwen2 models are Llama's blocks with a sliding window (Qwen2: and biases on q, k, v, which the
projections carry); without a window they run here too.

The transformers forward costs more than the work of a small model's decode step: generic cache objects,
mask builders and per-layer dispatch add ~20 ms per token to SmolLM2-135M on two cores, more than its
quantized linears take. This forward keeps the model's own modules (embeddings, norms, projections, MLP,
rotary embedding, head), so weights and numerics are the model's, and does only the step's work: one
rotary table, one attention mask, a KV cache grown in place and `scaled_dot_product_attention` per layer.
With LUT-kernel layers (`ShiftAddLinear`, Latency mode) the torch ops between them run on one thread
and the kernels on all (`kernels.use_threads`); the head gets every thread again. When every projection
is such a layer (an fp32 model quantized with `--mode lat`), a single sequence's decode step runs all
blocks in one native call (`_cpu.ShiftAddLlama`, kernels/cpu/shiftadd_llama.cpp) on KV buffers that grow
by doubling; the state it returns is views of them, and a state it did not make is copied in first. Threads
decoding through one model take turns on the buffers (each then copies its own state in).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.kernels import backend, cpu_module, use_threads
from mulfree.models.hf_adapter import HFCausalLM
from mulfree.models.transformer import KVCache, step_positions
from mulfree.nn.attention import append_kv, attend_rows

# Config fields this forward does not implement; a model using any of them runs through `HFCausalLM`.
UNSUPPORTED = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
# Model types whose causal LM is Llama's blocks (their modeling files differ from Llama's only in the window).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def supports(model: nn.Module) -> bool:
    """Whether `LlamaLM` runs this transformers model exactly: a Llama, Mistral or Qwen2 causal LM without extras
    (no sliding window, no soft-capping, every layer full attention)."""
    config = model.config
    return (
        type(model).__name__ == ARCHITECTURES.get(config.model_type)
        and getattr(config, "pretraining_tp", 1) == 1
        and not any(getattr(config, name, None) for name in UNSUPPORTED)
        and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama applies it (halves rotated, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaLM(HFCausalLM):
    """`HFCausalLM` for a transformers Llama, Mistral or Qwen2 causal LM (`supports`), with our lean forward (module
    docstring)."""

    rows_kv = True  # takes a list of rows' own caches per layer for a batched decode step (`nn.attention`)

    def __init__(self, model: nn.Module):
        if not supports(model):
            raise ValueError(f"LlamaLM runs {', '.join(ARCHITECTURES.values())} models without extras, not "
                             f"{type(model).__name__}")
        from mulfree.quant.qlinear import ShiftAddLinear

        super().__init__(model)
        c = model.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.lut = any(isinstance(m, ShiftAddLinear) and m.col_group == 8 for m in model.modules())
        self.native = _NativeDecode.build(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        state: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """The contract of `HFCausalLM.forward` (logits fp32 and a (k, v) [B, H_kv, past + T, Dh] per layer)."""
        B, T = input_ids.shape
        past, positions = step_positions(input_ids, state, positions)
        if (self.native is not None and B == 1 and T == 1 and state is not None and not torch.is_grad_enabled()
                and (key_mask is None or bool(key_mask.all())) and backend() != "reference"):
            return self.native.step(input_ids, state, positions)
        inner = self.hf.model
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, Dh]
        mask = self._mask(B, T, past, key_mask, h.device)
        threads = torch.get_num_threads()
        cache: KVCache = []
        with use_threads(threads, 1 if self.lut else None):
            for i, layer in enumerate(inner.layers):
                kv = None if state is None else state[i]
                a, kv = self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, kv, mask)
                h = h + a
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                cache.append(kv)
            h = inner.norm(h)
        return self.hf.lm_head(h).float(), cache

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, kv, mask) -> tuple[torch.Tensor, tuple]:
        B, T, _ = x.shape
        qk = torch.cat((attn.q_proj(x), attn.k_proj(x)), dim=-1).view(B, T, self.heads + self.kv_heads, -1)
        qk = _rotate(qk.transpose(1, 2), cos, sin)  # one rotation for q and k
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = attn.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if isinstance(kv, list):  # rows' own caches, one token each
            out, kv = attend_rows(q, k, v, kv, attn.scaling, self.kv_heads != self.heads)
            return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1)), kv
        if kv is not None:
            k, v = append_kv(kv[0], k), append_kv(kv[1], v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=self.kv_heads != self.heads)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k, v)

    @staticmethod
    def _mask(B: int, T: int, past: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Bool [B, 1, T, past + T] (True = attend): causal over the step's keys and the key mask, and every
        query its own key (a padding query would otherwise see no key and make NaNs that masked reads still
        multiply by 0); None when every key may be read (one query and no padding)."""
        if T == 1 and (key_mask is None or bool(key_mask.all())):
            return None
        keys = torch.arange(past + T, device=device)
        query_pos = (past + torch.arange(T, device=device))[:, None]
        mask = (keys[None, :] <= query_pos)[None, None].expand(B, 1, T, past + T)
        if key_mask is not None:
            mask = (mask & key_mask[:, None, None, :]) | (keys[None, :] == query_pos)
        return mask


class _NativeDecode:
    """`ShiftAddLlama` over a `LlamaLM` whose projections all run the LUT kernels, with its KV buffers."""

    def __init__(self, lm: LlamaLM, native):
        self.lm, self.native = lm, native
        self.keys: list[torch.Tensor] = []  # per block fp32 [1, H_kv, capacity, Dh]
        self.values: list[torch.Tensor] = []
        self.length = -1  # positions filled in the buffers (-1: no buffers yet)
        self.turn = threading.Lock()  # the buffers serve one step at a time

    @classmethod
    def build(cls, lm: LlamaLM) -> _NativeDecode | None:
        """The native decoder, or None when the model has other projections, dtypes or activations."""
        from mulfree.quant.qlinear import ShiftAddLinear

        inner, mod = lm.hf.model, cpu_module()
        if mod is None or lm.config.hidden_act != "silu" or inner.embed_tokens.weight.dtype != torch.float32:
            return None
        blocks, norms = [], []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            projections = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
            if not all(isinstance(p, ShiftAddLinear) and p.col_group == 8 for p in projections):
                return None
            blocks.append([p.kernel_weights().handle() for p in projections])
            norms.append([layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()])
        eps = inner.layers[0].input_layernorm.variance_epsilon
        native = mod.ShiftAddLlama(blocks, norms, lm.config.hidden_size, lm.heads, lm.kv_heads, lm.head_dim, eps,
                                   inner.layers[0].self_attn.scaling)
        return cls(lm, native)

    def step(self, input_ids: torch.Tensor, state: KVCache, positions: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """One token of one sequence: the native blocks, then the model's own final norm and head."""
        with self.turn:
            return self._step(input_ids, state, positions)

    def _step(self, input_ids: torch.Tensor, state: KVCache, positions: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        past = state[0][0].shape[2]
        if not (self.length == past and self.keys and state[0][0].data_ptr() == self.keys[0].data_ptr()):
            self._adopt(state, past)
        if past == self.keys[0].shape[2]:
            self._adopt([(k[:, :, :past], v[:, :, :past]) for k, v in zip(self.keys, self.values)], past)
        inner = self.lm.hf.model
        x = inner.embed_tokens(input_ids)[0, 0].float().clone()
        cos, sin = inner.rotary_emb(x.view(1, 1, -1), positions)
        self.native.step(x, cos[0, 0].contiguous(), sin[0, 0].contiguous(), [k[0] for k in self.keys],
                         [v[0] for v in self.values], past, backend(), torch.get_num_threads())
        self.length = past + 1
        logits = self.lm.hf.lm_head(inner.norm(x.view(1, 1, -1))).float()
        return logits, [(k[:, :, : self.length], v[:, :, : self.length]) for k, v in zip(self.keys, self.values)]

    def _adopt(self, state: KVCache, past: int) -> None:
        """Copy `state` into fresh buffers with room to grow (earlier views of the old ones stay valid)."""
        cap = max(64, 2 * past)
        shape = (1, self.lm.kv_heads, cap, self.lm.head_dim)
        self.keys = [torch.zeros(shape) for _ in state]
        self.values = [torch.zeros(shape) for _ in state]
        for (k, v), kb, vb in zip(state, self.keys, self.values):
            kb[:, :, :past].copy_(k)
            vb[:, :, :past].copy_(v)
        self.length = past
