"""Packed-weight CPU runtime for MMfree models: 2-bit or 1.6-bit ternary weights, recurrent state, prefill,
decode and sampling. The whole forward runs in the compiled `Engine` (one native call per step,
GIL released); with backend "reference" or no extension it runs the same math in pure torch.

A packed model dir (written by `mulfree pack`) holds `config.json` (the model config plus
`format` ("mulfree-t2" or "mulfree-t1"), `format_version` and a CRC-32 of the weights), `model.safetensors`, the
tokenizer and `checksums.json` (xxh3 of the other files, `mulfree.integrity`; dirs packed before it have
the CRC-32 only). Formats of the weights: `mulfree.ops.pack` (T2R4, 2 bits), `mulfree.ops.pack_t1` (T1R4, 1.6 bits)
and docs/packed.md; both give the same integer results, so a model runs the same in either.

Two norm eps, as the official model: `rms_norm_eps` for attn_norm, g_norm, mlp_norm and model.norm;
`bitlinear_norm_eps(config)` (the config's `bitlinear_eps`, else `rms_norm_eps`) for every BitLinear's
own input norm (the rmsnorm_quant before i/f/g/o_proj, gate/down_proj and lm_head).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mulfree.data.text import load_tokenizer
from mulfree.errors import CheckpointError
from mulfree.infer.packed_layout import (
    LAYER_FIELDS,
    PackedReferenceLinear,
    PackedReferenceNorm,
    linear_shapes,
    pack_state_dict,
    repack,
    skeleton,
    validate_tensors,
)
from mulfree.kernels import cpu_module
from mulfree.kernels.ternary import resolve_backend
from mulfree.models.mmfree import MMFreeForCausalLM, bitlinear_norm_eps
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.norm import RMSNorm
from mulfree.ops.pack import FORMAT, FORMATS, packed_format

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
PREFILL_CHUNK = 512  # tokens per native prefill call (bounds scratch memory: ~25 MB at the 1.3b shape)


def pick_engine(config: dict[str, Any], requested: str, source: str) -> str:
    """`packed` or `torch` for a model dir's config: `auto` runs MMfree dirs (packed, or packed in memory) on the
    packed engine and everything else on torch; an explicit choice the dir cannot run is one line."""
    packed_dir, mmfree = "format" in config, config.get("model_type") == "mmfree"
    if requested == "torch" and packed_dir:
        raise CheckpointError(f"{source} is a packed dir: it runs on the packed engine only",
                              "drop --engine torch, or pass the unpacked model dir")
    if requested == "packed" and not (packed_dir or mmfree):
        raise CheckpointError(f"{source} is not an MMfree model: the packed engine runs MMfree models only",
                              "use --engine torch (or auto)")
    return "packed" if packed_dir or (mmfree and requested != "torch") else "torch"


class PackedModel:
    """An MMfree model on packed ternary weights (format mulfree-t2: 2 bits per weight, or mulfree-t1: 1.6), with
    its recurrent state.

    Example:
        pm = PackedModel.load("out/packed")
        new_ids = pm.generate([1, 42, 7], max_new_tokens=32)   # greedy
    """

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any = None,
                 backend: str | None = None, threads: int = 0, fmt: str | None = None):
        """`tensors` in format `fmt` (None: the config's `format`, else mulfree-t2)."""
        self.format = packed_format(fmt or config.get("format", FORMAT))
        validate_tensors(config, tensors, "packed model", self.format.name)
        self.config = config
        self.tokenizer = tokenizer
        self.tensors = tensors
        self.backend = resolve_backend(backend)
        self.threads = threads
        self.num_layers = config["num_hidden_layers"]
        self.eps = float(config.get("rms_norm_eps", 1e-6))  # attn_norm, g_norm, mlp_norm, model.norm
        self.bitlinear_eps = bitlinear_norm_eps(config)  # every BitLinear's input norm
        self.use_lb = bool(config.get("use_lower_bound", True))
        self._linears = linear_shapes(config)
        self._engine = self._build_engine() if self.backend != "reference" else None
        self._reference: MMFreeForCausalLM | None = None  # built on the first reference forward
        self.reset()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, backend: str | None = None, threads: int = 0,
             fmt: str | None = None) -> PackedModel:
        """Load a packed dir (`mulfree pack`), or pack an ordinary MMfree model dir in memory. `fmt` (a name of
        `mulfree.ops.pack.packed_format`) is the format to run: None keeps a packed dir's own and packs a model dir
        as mulfree-t2; a packed dir of the other format is repacked in memory (the same trits and scales).

        Checked before anything is allocated: the config (types, ranges, the memory the model needs), the
        tokenizer against the vocabulary, then the checksums (`checksums.json`; the CRC-32 of dirs packed
        before it). Every failure is a one-line CheckpointError / ConfigError naming the file and field."""
        from mulfree import integrity
        from mulfree.models import schema
        from mulfree.models.io import read_config, read_weights

        model_dir = Path(model_dir)
        cfg = read_config(model_dir)  # a JSON object (an ordinary model config is validated too)
        source = str(model_dir / CONFIG_NAME)
        weights = model_dir / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing", "pass a complete model dir")
        target = packed_format(fmt) if fmt is not None else None
        packed = "format" in cfg
        if packed:
            name, version = cfg["format"], cfg.get("format_version")
            if isinstance(name, str) and name not in FORMATS:
                raise CheckpointError(f"{source}: unknown format {schema.show(name)}",
                                      f"expected one of {', '.join(repr(f) for f in FORMATS)}")
            want = FORMATS[name].version if isinstance(name, str) else version  # a bad type: validate_packed_config
            if isinstance(version, int) and not isinstance(version, bool) and version != want:
                raise CheckpointError(f"{source}: format_version {version} of {name} is not supported (this mulfree "
                                      f"reads {want})", "re-pack the model with this mulfree version")
            schema.validate_packed_config(cfg, source)
        else:
            if cfg.get("model_type") != "mmfree":
                raise CheckpointError(f"{model_dir} holds a {schema.show(cfg.get('model_type'))} model",
                                      "the packed engine runs MMfree models only")
            config = schema.model_config(cfg, source)
            # the float weights read from disk, then their packed form
            schema.check_memory(weights.stat().st_size + schema.estimate_packed_bytes(config), source)
            cfg = config.to_dict()
        tokenizer = None
        if (model_dir / TOKENIZER_NAME).is_file():  # checked before the checksums: names the bad token id
            tokenizer = load_tokenizer(model_dir)
            schema.check_tokenizer(tokenizer, cfg["vocab_size"], str(model_dir / TOKENIZER_NAME))
        integrity.verify(model_dir, [CONFIG_NAME, WEIGHTS_NAME] + [TOKENIZER_NAME] * (tokenizer is not None))
        if not packed:
            name = (target or packed_format(FORMAT)).name
            return cls(cfg, pack_state_dict(cfg, read_weights(weights, verify=False), name), tokenizer, backend,
                       threads, fmt=name)
        data = weights.read_bytes()
        if zlib.crc32(data) != cfg["crc32"]:
            raise CheckpointError(f"{weights} is corrupt or truncated (CRC-32 mismatch)",
                                  "re-run `mulfree pack` to rewrite it")
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # a bad header
            raise CheckpointError(f"cannot read {weights} ({schema.first_line(exc)})", "re-run `mulfree pack`") from None
        validate_tensors(cfg, tensors, str(weights), cfg["format"])  # in the dir's own format, before any repacking
        if target is not None and target.name != cfg["format"]:
            tensors = repack(cfg, tensors, cfg["format"], target.name)
        return cls(cfg, tensors, tokenizer, backend, threads, fmt=(target.name if target else cfg["format"]))

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None, backend: str | None = None,
                   threads: int = 0, fmt: str = FORMAT) -> PackedModel:
        """Pack an in-memory `MMFreeForCausalLM` in format `fmt`."""
        cfg = model.config.to_dict()
        name = packed_format(fmt).name
        return cls(cfg, pack_state_dict(cfg, model.state_dict(), name), tokenizer, backend, threads, fmt=name)

    def save(self, out_dir: str | Path) -> None:
        """Write the packed dir: model.safetensors, tokenizer, config.json (format, version, CRC-32), and last
        checksums.json over those files. Each file is written atomically (temp file + rename)."""
        from safetensors.torch import save

        from mulfree.atomic import atomic_write, atomic_write_text
        from mulfree.integrity import write_manifest

        out = Path(out_dir)
        f = self.format
        data = save(self.tensors, metadata={"format": f.name, "format_version": str(f.version)})
        atomic_write(out / WEIGHTS_NAME, lambda tmp: tmp.write_bytes(data))
        names = [WEIGHTS_NAME, CONFIG_NAME]
        if self.tokenizer is not None:
            atomic_write(out / TOKENIZER_NAME, lambda tmp: self.tokenizer.save(str(tmp)))
            names.append(TOKENIZER_NAME)
        cfg = {**self.config, "format": f.name, "format_version": f.version, "crc32": zlib.crc32(data)}
        atomic_write_text(out / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
        write_manifest(out, names)

    def _packed_linear(self, mod, name: str):
        n, k = self._linears[name]
        t = self.tensors
        return mod.PackedLinear(t[name + ".packed"], n, k, float(t[name + ".scale"][0]), t[name + ".norm.weight"],
                                format=self.format.short)

    def _build_engine(self):
        mod = cpu_module()
        cfg, t = self.config, self.tensors
        eng = mod.Engine(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], self.eps, self.backend,
                         self.threads, bitlinear_eps=self.bitlinear_eps)
        emb = t["model.embeddings.weight"]
        if emb.dtype == torch.bfloat16:
            eng.set_embedding_bf16(emb.view(torch.int16).numpy().view("uint16"))
        else:
            eng.set_embedding_f32(emb)
        eng.set_head(t["model.norm.weight"], self._packed_linear(mod, "lm_head"))
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            fields = {field: self._packed_linear(mod, p + module) if p + module in self._linears
                      else t[p + module + ".weight"] for module, field in LAYER_FIELDS.items()}
            lb = t["model.lb"][n] if self.use_lb and n > 0 else None
            eng.add_layer(mod.Layer(**fields, lower_bound=lb))
        return eng

    def _build_reference(self) -> MMFreeForCausalLM:
        """The nn model walk with the engine's reference leaves: each BitLinear a PackedReferenceLinear, each
        RMSNorm a PackedReferenceNorm, the embedding in fp32 and the stored lower bounds."""
        model, t = skeleton(self.config), self.tensors
        for name, m in list(model.named_modules()):
            if isinstance(m, BitLinear):
                n, k = self._linears[name]
                new = PackedReferenceLinear(t[name + ".packed"], n, k, t[name + ".scale"], t[name + ".norm.weight"],
                                            self.bitlinear_eps, self.format.name)
            elif isinstance(m, RMSNorm) and name.rpartition(".")[0] not in self._linears:
                new = PackedReferenceNorm(m.weight.shape[0], self.eps)
                new.weight = nn.Parameter(t[name + ".weight"], requires_grad=False)
            else:
                continue
            model.set_submodule(name, new)
        emb = t["model.embeddings.weight"].float()
        model.model.embeddings = nn.Embedding.from_pretrained(emb)
        # The stored per-layer vectors, not the trained parameter; none in layer 0, as the engine applies them.
        lb = t["model.lb"].clone() if self.use_lb else None
        if lb is not None:
            lb[0] = 0.0
        model.model.layer_lower_bounds = lambda: lb
        return model.eval()

    # ---- forward ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: zero the recurrent state (one fp32 [hidden] per layer)."""
        self.state = self.new_state()

    def new_state(self) -> torch.Tensor:
        """A fresh recurrent state fp32 [L, d] (zeros) for a sequence kept outside `self.state`."""
        return torch.zeros(self.num_layers, self.config["hidden_size"])

    def forward(self, ids: list[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens [T] after the current state; returns logits fp32 [T, V] (all_logits) or [1, V] (last).
        `self.state` is one sequence: threads decoding sequences of their own use `prefill_state` / `step`."""
        return self._run(self._token_ids(ids), self.state, all_logits)

    def prefill_state(self, ids: list[int] | torch.Tensor, state: torch.Tensor | None = None,
                      all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed tokens [T] after `state` (None: a fresh one), leaving `self.state` alone; returns (the last
        token's logits [V], or every token's [T, V] with `all_logits`; the state [L, d], updated in place when
        given). A long prompt can be fed in chunks between decode steps by passing the state back in."""
        state = self.new_state() if state is None else self._check_states(state, (self.num_layers,))
        logits = self._run(self._token_ids(ids), state, all_logits)
        return (logits if all_logits else logits[0]), state

    def decode_batch(self, tokens: list[int] | torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """One decode step of B independent sequences at any positions: token b follows states[b]. tokens [B];
        states fp32 [B, L, d], contiguous (a server keeping per-sequence states gathers them in and scatters
        them back), updated in place; returns logits fp32 [B, V]. Each linear runs once over the B tokens."""
        ids = self._token_ids(tokens)
        states = self._check_states(states, (ids.numel(), self.num_layers))
        if self._engine is None:  # the reference walk, one sequence at a time
            return torch.cat([self._forward_reference(ids[b:b + 1], False, states[b]) for b in range(ids.numel())])
        logits = torch.empty(ids.numel(), self.config["vocab_size"])
        self._engine.forward_batch(ids, states, logits)
        return logits

    def step(self, chunks: list[list[int]], states: list[torch.Tensor]) -> torch.Tensor:
        """One continuous-batching step: sequence s feeds `chunks[s]` (one decode token or a prompt chunk) after
        `states[s]` (fp32 [L, d], updated in place); returns logits fp32 [S, V] of each sequence's last token.
        Every linear runs once over all the tokens of the step, so prompt chunks ride along with decode tokens."""
        if len(chunks) != len(states) or not chunks:
            raise ValueError(f"need one state per chunk (and a chunk at least), got {len(chunks)} and {len(states)}")
        ids = [self._token_ids(c) for c in chunks]
        states = [self._check_states(s, (self.num_layers,)) for s in states]
        if len({s.data_ptr() for s in states}) != len(states):
            raise ValueError("two sequences share one state tensor")
        if self._engine is None:
            return torch.cat([self._forward_reference(i, False, s) for i, s in zip(ids, states)])
        logits = torch.empty(len(ids), self.config["vocab_size"])
        lengths = torch.tensor([i.numel() for i in ids], dtype=torch.long)
        self._engine.forward_ragged(torch.cat(ids), lengths, states, logits)
        return logits

    def _check_states(self, states: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        """states as given (updated in place, so never copied): fp32, contiguous, shape lead + (hidden,)."""
        shape = (*lead, self.config["hidden_size"])
        if not isinstance(states, torch.Tensor) or states.dtype != torch.float32 or tuple(states.shape) != shape:
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"state must be a float32 tensor of shape {shape}, got {got}")
        if not states.is_contiguous() or states.device.type != "cpu":
            raise ValueError("state must be a contiguous CPU tensor (it is updated in place)")
        return states

    def _run(self, ids: torch.Tensor, state: torch.Tensor, all_logits: bool) -> torch.Tensor:
        outs = []
        for start in range(0, ids.numel(), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK].contiguous()
            last = start + PREFILL_CHUNK >= ids.numel()
            if self._engine is not None:
                rows = chunk.numel() if all_logits else 1
                logits = torch.empty(rows, self.config["vocab_size"])
                self._engine.forward(chunk, state, logits, all_logits)
            else:
                logits = self._forward_reference(chunk, all_logits, state)
            if all_logits or last:
                outs.append(logits)
        return torch.cat(outs) if all_logits else outs[-1]

    def _token_ids(self, ids: list[int] | torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
        """ids as a flat int64 tensor; ValueError (one line) for an empty (unless allowed), non-integer or
        out-of-range id list."""
        from mulfree.models.schema import first_line

        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ValueError(f"token ids must be a list or tensor of integers ({first_line(exc)})") from None
        if t.numel() == 0:
            if allow_empty:
                return torch.zeros(0, dtype=torch.long)
            raise ValueError("forward needs at least one token")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"token ids must be integers, got dtype {t.dtype}")
        t = t.to(torch.long).flatten().contiguous()
        vocab = self.config["vocab_size"]
        if t.min() < 0 or t.max() >= vocab:
            bad = int(t[(t < 0) | (t >= vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary: ids must be in [0, {vocab})")
        return t

    @torch.no_grad()
    def _forward_reference(self, ids: torch.Tensor, all_logits: bool, state: torch.Tensor) -> torch.Tensor:
        if self._reference is None:
            self._reference = self._build_reference()
        hidden, new = self._reference.model(ids[None], [h[None] for h in state])
        state.copy_(torch.cat(new))
        return self._reference.lm_head(hidden[0] if all_logits else hidden[0, -1:])

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ids: list[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = 0, top_p: float | None = 1.0, seed: int = 0,
                 on_token: Callable[[int], None] | None = None, eos_token_id: int | None = None) -> list[int]:
        """Prefill `ids` from a fresh state, then decode up to `max_new_tokens`; returns the new token ids.

        Greedy when temperature == 0; otherwise samples with top-k / top-p from a generator seeded by `seed`.
        `on_token` receives each new id as soon as it is chosen. The sequence's state is the call's own (`self.state`
        is left alone), so several threads may generate at once; their engine calls take turns.
        """
        from mulfree.generation import check_lengths
        from mulfree.ops.sampling import sample_next
        from mulfree.settings import GenerationConfig

        GenerationConfig(max_new_tokens, temperature, top_k, top_p, seed)  # one-line ConfigError, as torch generate
        ids = self._token_ids(ids, allow_empty=True)  # empty: check_lengths' message, as torch generate
        check_lengths(None, ids.numel(), max_new_tokens)  # recurrent: no position limit
        vocab = self.config["vocab_size"]
        if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                         or not 0 <= eos_token_id < vocab):
            raise ValueError(f"eos_token_id must be an id in [0, {vocab}), got {eos_token_id!r}")
        gen = torch.Generator().manual_seed(seed)
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        state = self.new_state()
        logits = self._run(ids, state, False)
        for i in range(max_new_tokens):
            token = int(sample_next(logits, temperature, top_k or None, top_p, gen)[0])
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token == eos_token_id or i == max_new_tokens - 1:
                break
            logits = self._run(torch.tensor([token]), state, False)
        return out


class PackedLM(nn.Module):
    """A PackedModel in our torch models' interface, `(logits [B, T, V], state) = lm(ids [B, T], state)`, so
    perplexity, lm-eval scoring and the generation loop run on packed dirs. Each row starts from `state` (one
    [L, d] per row, or None: fresh); recurrent, so there is no position limit."""

    def __init__(self, packed: PackedModel):
        super().__init__()
        self.packed = packed
        self.config = SimpleNamespace(**{**packed.config, "max_position_embeddings": 1 << 30})

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = [self.packed.new_state() for _ in input_ids] if state is None else [s.clone() for s in state]
        logits = [self.packed._run(self.packed._token_ids(row), s, all_logits=True) for row, s in zip(input_ids, states)]
        return torch.stack(logits), states
