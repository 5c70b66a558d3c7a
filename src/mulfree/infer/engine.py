"""Packed-weight CPU runtime for MMfree models: 2-bit ternary weights, recurrent state, prefill,
decode and sampling. The whole forward runs in the compiled `Engine` (one native call per step,
GIL released); with backend "reference" or no extension it runs the same math in pure torch.

A packed model dir (written by `mulfree pack`) holds `config.json` (the model config plus
`format: "mulfree-t2"`, `format_version` and a CRC-32 of the weights), `model.safetensors` and the
tokenizer. Format of the weights: `mulfree.ops.pack` and docs/packed.md.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mulfree.data.text import load_tokenizer
from mulfree.errors import CheckpointError
from mulfree.kernels import cpu_module
from mulfree.kernels.ternary import resolve_backend
from mulfree.ops import fused
from mulfree.ops.pack import FORMAT, FORMAT_VERSION, pack_ternary, packed_shape, padded_k, ternarize, unpack_ternary

LAYER_LINEARS = ("attn.i_proj", "attn.f_proj", "attn.g_proj", "attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
PREFILL_CHUNK = 512  # tokens per native prefill call (bounds scratch memory: ~25 MB at the 1.3b shape)


def _linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"lm_head": (cfg["vocab_size"], d)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name in LAYER_LINEARS[:4]:
            shapes[p + name] = (d, d)
        shapes[p + "mlp.gate_proj"] = (2 * inter, d)
        shapes[p + "mlp.down_proj"] = (d, inter)
    return shapes


def _vectors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    out: dict[str, tuple[int, ...]] = {"model.embeddings.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,),
                                       "model.lb": (L, d)}
    for name, (_, k) in _linear_shapes(cfg).items():
        out[name + ".norm.weight"] = (k,)
        out[name + ".scale"] = (1,)
    for n in range(L):
        p = f"model.layers.{n}."
        out[p + "attn_norm.weight"] = (d,)
        out[p + "attn.g_norm.weight"] = (d,)
        out[p + "mlp_norm.weight"] = (d,)
    return out


def pack_state_dict(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn an MMfree state dict (official key names) into packed tensors: trits + original scale per linear."""
    if cfg.get("output_gate", "official") != "official":
        raise CheckpointError(f"output_gate {cfg['output_gate']!r} is not supported by the packed engine",
                              "pack a model trained with the official output gate")
    out: dict[str, torch.Tensor] = {}
    for name, (n, k) in _linear_shapes(cfg).items():
        w = state[name + ".weight"]
        if tuple(w.shape) != (n, k):
            raise CheckpointError(f"{name}.weight has shape {tuple(w.shape)}, the config expects {(n, k)}",
                                  "check that config.json belongs to these weights")
        t, scale = ternarize(w)
        out[name + ".packed"] = pack_ternary(t)
        out[name + ".scale"] = torch.tensor([scale], dtype=torch.float32)
        out[name + ".norm.weight"] = state[name + ".norm.weight"].float().contiguous()
    emb = state["model.embeddings.weight"]
    out["model.embeddings.weight"] = (emb if emb.dtype == torch.bfloat16 else emb.float()).contiguous()
    out["model.norm.weight"] = state["model.norm.weight"].float().contiguous()
    L, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    if cfg.get("use_lower_bound", True):
        p = state["model.lower_bounds"].float().softmax(dim=0)
        out["model.lb"] = (p.cumsum(dim=0) - p[0]).contiguous()
    else:
        out["model.lb"] = torch.zeros(L, d)
    for n in range(L):
        p = f"model.layers.{n}."
        for key in ("attn_norm.weight", "attn.g_norm.weight", "mlp_norm.weight"):
            out[p + key] = state[p + key].float().contiguous()
    return out


def _validate(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    expect = {name + ".packed": packed_shape(n, k) for name, (n, k) in _linear_shapes(cfg).items()}
    expect.update(_vectors(cfg))
    missing = sorted(set(expect) - set(tensors))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors (e.g. {missing[0]})",
                              "re-pack the model with `mulfree pack`")
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the config expects "
                                  f"{tuple(shape)}", "check that config.json belongs to these weights")


class PackedModel:
    """An MMfree model on packed 2-bit weights, with its recurrent state.

    Example:
        pm = PackedModel.load("out/packed")
        new_ids = pm.generate([1, 42, 7], max_new_tokens=32)   # greedy
    """

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any = None,
                 backend: str | None = None, threads: int = 0):
        _validate(config, tensors, "packed model")
        self.config = config
        self.tokenizer = tokenizer
        self.tensors = tensors
        self.backend = resolve_backend(backend)
        self.threads = threads
        self.num_layers = config["num_hidden_layers"]
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.use_lb = bool(config.get("use_lower_bound", True))
        self._engine = self._build_engine() if self.backend != "reference" else None
        self._trits: dict[str, torch.Tensor] = {}
        self.reset()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, backend: str | None = None, threads: int = 0) -> "PackedModel":
        """Load a packed dir (`mulfree pack`), or pack an ordinary MMfree model dir in memory."""
        from mulfree.models.io import read_config, read_weights

        model_dir = Path(model_dir)
        cfg = read_config(model_dir)
        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing", "pass a complete model dir")
        tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        if "format" not in cfg:
            if cfg.get("model_type") != "mmfree":
                raise CheckpointError(f"{model_dir} holds a {cfg.get('model_type')!r} model",
                                      "the packed engine runs MMfree models only")
            from mulfree.models.io import build_model

            cfg = build_model(cfg).config.to_dict()
            return cls(cfg, pack_state_dict(cfg, read_weights(weights)), tokenizer, backend, threads)
        if cfg["format"] != FORMAT:
            raise CheckpointError(f"{model_dir}: unknown format {cfg['format']!r}", f"expected {FORMAT!r}")
        if cfg.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{model_dir}: format_version {cfg.get('format_version')!r} is not supported "
                                  f"(this mulfree reads {FORMAT_VERSION})", "re-pack the model with this mulfree version")
        data = weights.read_bytes()
        if zlib.crc32(data) != cfg.get("crc32"):
            raise CheckpointError(f"{weights} is corrupt or truncated (CRC-32 mismatch)",
                                  "re-run `mulfree pack` to rewrite it")
        try:
            from safetensors.torch import load

            tensors = load(data)
        except Exception as exc:  # safetensors raises several types on a bad header
            raise CheckpointError(f"cannot read {weights} ({exc})", "re-run `mulfree pack`") from exc
        return cls(cfg, tensors, tokenizer, backend, threads)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None, backend: str | None = None,
                   threads: int = 0) -> "PackedModel":
        """Pack an in-memory `MMFreeForCausalLM`."""
        cfg = model.config.to_dict()
        return cls(cfg, pack_state_dict(cfg, model.state_dict()), tokenizer, backend, threads)

    def save(self, out_dir: str | Path) -> None:
        """Write the packed dir: model.safetensors, config.json (format, version, CRC-32), tokenizer."""
        from safetensors.torch import save

        from mulfree.atomic import atomic_write, atomic_write_text

        out = Path(out_dir)
        data = save(self.tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        atomic_write(out / "model.safetensors", lambda tmp: tmp.write_bytes(data))
        if self.tokenizer is not None:
            atomic_write(out / "tokenizer.json", lambda tmp: self.tokenizer.save(str(tmp)))
        cfg = {**self.config, "format": FORMAT, "format_version": FORMAT_VERSION, "crc32": zlib.crc32(data)}
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")

    def _linear(self, mod, name: str):
        n, k = _linear_shapes(self.config)[name]
        t = self.tensors
        return mod.PackedLinear(t[name + ".packed"], n, k, float(t[name + ".scale"][0]), t[name + ".norm.weight"])

    def _build_engine(self):
        mod = cpu_module()
        cfg, t = self.config, self.tensors
        eng = mod.Engine(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], self.eps, self.backend,
                         self.threads)
        emb = t["model.embeddings.weight"]
        if emb.dtype == torch.bfloat16:
            eng.set_embedding_bf16(emb.view(torch.int16).numpy().view("uint16"))
        else:
            eng.set_embedding_f32(emb)
        eng.set_head(t["model.norm.weight"], self._linear(mod, "lm_head"))
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            lin = [self._linear(mod, p + name) for name in LAYER_LINEARS]
            eng.add_layer(t[p + "attn_norm.weight"], *lin[:4], t[p + "attn.g_norm.weight"], t["model.lb"][n],
                          self.use_lb and n > 0, t[p + "mlp_norm.weight"], *lin[4:])
        return eng

    # ---- forward ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: zero the recurrent state (one fp32 [hidden] per layer)."""
        self.state = torch.zeros(self.num_layers, self.config["hidden_size"])

    def forward(self, ids: list[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens [T] after the current state; returns logits fp32 [T, V] (all_logits) or [1, V] (last)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().contiguous()
        if ids.numel() == 0:
            raise ValueError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= self.config["vocab_size"]:
            raise ValueError(f"token ids must be in [0, {self.config['vocab_size']})")
        outs = []
        for start in range(0, ids.numel(), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK].contiguous()
            last = start + PREFILL_CHUNK >= ids.numel()
            if self._engine is not None:
                rows = chunk.numel() if all_logits else 1
                logits = torch.empty(rows, self.config["vocab_size"])
                self._engine.forward(chunk, self.state, logits, all_logits)
            else:
                logits = self._forward_reference(chunk, all_logits)
            if all_logits or last:
                outs.append(logits)
        return torch.cat(outs) if all_logits else outs[-1]

    def _bitlinear_ref(self, name: str, x: torch.Tensor) -> torch.Tensor:
        n, k = _linear_shapes(self.config)[name]
        if name not in self._trits:
            self._trits[name] = unpack_ternary(self.tensors[name + ".packed"], (n, padded_k(k))).to(torch.int64)
        q, a_scale, _ = fused.rmsnorm_quant_ref(x, self.tensors[name + ".norm.weight"], self.eps)
        dot = q.to(torch.int64) @ self._trits[name].T
        return dot.float() * (a_scale[:, None] * self.tensors[name + ".scale"])

    def _forward_reference(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        t, eps = self.tensors, self.eps
        h = t["model.embeddings.weight"][ids].float()
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            a = fused.rmsnorm_ref(h, t[p + "attn_norm.weight"], eps)
            fi, ff, fg = (self._bitlinear_ref(p + f"attn.{g}_proj", a) for g in "ifg")
            lb = t["model.lb"][n] if self.use_lb and n > 0 else None
            o, self.state[n] = fused.mlgru_step_ref(fi, ff, fg, lb, t[p + "attn.g_norm.weight"], eps, self.state[n])
            h = h + self._bitlinear_ref(p + "attn.o_proj", o)
            m = fused.rmsnorm_ref(h, t[p + "mlp_norm.weight"], eps)
            z = fused.glu_step_ref(self._bitlinear_ref(p + "mlp.gate_proj", m))
            h = h + self._bitlinear_ref(p + "mlp.down_proj", z)
        if not all_logits:
            h = h[-1:]
        return self._bitlinear_ref("lm_head", fused.rmsnorm_ref(h, t["model.norm.weight"], eps))

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ids: list[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = 0, top_p: float | None = 1.0, seed: int = 0,
                 on_token: Callable[[int], None] | None = None, eos_token_id: int | None = None) -> list[int]:
        """Prefill `ids` from a fresh state, then decode up to `max_new_tokens`; returns the new token ids.

        Greedy when temperature == 0; otherwise samples with top-k / top-p from a generator seeded by `seed`.
        `on_token` receives each new id as soon as it is chosen.
        """
        from mulfree.ops.sampling import sample_next

        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        gen = torch.Generator().manual_seed(seed)
        self.reset()
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        logits = self.forward(ids)
        for i in range(max_new_tokens):
            token = int(sample_next(logits, temperature, top_k or None, top_p, gen)[0])
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token == eos_token_id or i == max_new_tokens - 1:
                break
            logits = self.forward([token])
        return out
