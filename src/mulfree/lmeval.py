"""lm-evaluation-harness bridge: mulfree models as an lm-eval `LM`, plus offline tasks built from held-out text.

The standard zero-shot suites (arc_easy, hellaswag, piqa, ...) fetch their data from the Hub, so they only
run where a Hugging Face datasets cache exists. The `mulfree_*` tasks need nothing but the bundled corpus:
cloze (LAMBADA-style last-word prediction), multiple choice (pick the true next line among four) and
rolling bits-per-byte (wikitext-style), all written from the validation plays as local JSONL + YAML.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mulfree.atomic import atomic_write_text
from mulfree.errors import MulfreeError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # the [eval] extra
    raise MulfreeError("lm-eval is not installed", "pip install 'mulfree[eval]'") from exc

from mulfree.generation import generate

OFFLINE_TASKS = ("mulfree_shakespeare_cloze", "mulfree_shakespeare_mc", "mulfree_shakespeare_bpb")
EOT = "<|endoftext|>"


class MulfreeLM(TemplateLM):
    """Our `(logits, state) = model(ids, state)` models (Hugging Face ones through `HFCausalLM`) behind
    lm-eval's request API (batch size 1). `tokenizer` is a `tokenizers.Tokenizer`; texts are encoded without
    special tokens (no BOS), as lm-eval's own HF model does. `eot_token_id` None: `<|endoftext|>`, else the
    config's eos id."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int = 1024,
                 eot_token_id: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.tok = tokenizer
        self.max_length = min(max_length, model.config.max_position_embeddings)
        eot = eot_token_id if eot_token_id is not None else tokenizer.token_to_id(EOT)
        self._eot = eot if eot is not None else (model.config.eos_token_id or 0)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it. A continuation longer
        than `max_length` is scored in chunks of `max_length` targets, each after the `max_length` tokens before
        it (context must be non-empty, as lm-eval makes it)."""
        tokens = context + continuation
        total, greedy = 0.0, True
        for start in range(len(context), len(tokens), self.max_length):
            end = min(start + self.max_length, len(tokens))
            inp = torch.tensor(tokens[max(0, end - 1 - self.max_length) : end - 1])[None]
            logits, _ = self.model(inp)
            logp = F.log_softmax(logits[0, start - end :].float(), dim=-1)
            target = torch.tensor(tokens[start:end])
            greedy &= bool((logp.argmax(-1) == target).all())
            total += float(logp.gather(1, target[:, None]).sum())
        return total, greedy

    # Each result goes to lm-eval's request cache as soon as it is known (`cache_hook`, a no-op without a cache), so
    # an interrupted run keeps what it scored.
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = []
        for key, ctx, cont in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            out.append(self._score(ctx, cont))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rolling loglikelihood"):
            tokens = self.tok_encode(req.args[0])
            windows = map(make_disjoint_window, get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, 1))
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = req.args
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else until
            max_new = int(kwargs.get("max_gen_toks", 128))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            seq = generate(self.model, torch.tensor(ids), max_new, temperature=float(kwargs.get("temperature", 0.0)),
                           seed=0, eos_token_id=self.eot_token_id)
            text = self.tok_decode(seq[0, len(ids) :].tolist())
            cut = min([text.find(s) for s in until if s in text], default=len(text))
            out.append(text[:cut])
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 5]


def build_offline_tasks(out_dir: Path, text: str, n: int = 500, seed: int = 0) -> Path:
    """Write the `mulfree_*` task YAMLs and JSONL data (from held-out `text`) into `out_dir`."""
    rng = random.Random(seed)
    lines = _lines(text)
    if len(lines) < 50:
        raise MulfreeError("held-out text is too short to build evaluation tasks", "use a larger corpus")
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = sorted(rng.sample(range(1, len(lines) - 1), min(n, len(lines) - 2)))
    cloze = []
    for i in picks:
        words = lines[i].split()
        last = re.sub(r"[^\w'-]", "", words[-1])
        if last:
            cloze.append({"context": lines[i - 1] + "\n" + " ".join(words[:-1]), "target": last})
    mc = []
    for i in picks:
        distractors = rng.sample([j for j in range(len(lines)) if j != i + 1], 3)
        choices = [lines[i + 1]] + [lines[j] for j in distractors]
        order = list(range(4))
        rng.shuffle(order)
        mc.append({"ctx": lines[i] + "\n", "choices": [choices[k] for k in order], "label": order.index(0)})
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) >= 30]
    bpb = [{"text": p} for p in paragraphs[: n // 5]]
    specs = {
        "mulfree_shakespeare_cloze": (cloze, ("output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
                                      "doc_to_target: \" {{target}}\"\nmetric_list:\n  - metric: perplexity\n"
                                      "    aggregation: perplexity\n    higher_is_better: false\n  - metric: acc\n"
                                      "    aggregation: mean\n    higher_is_better: true\n")),
        "mulfree_shakespeare_mc": (mc, ("output_type: multiple_choice\ndoc_to_text: \"{{ctx}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                                   "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                                   "    higher_is_better: true\n  - metric: acc_norm\n    aggregation: mean\n"
                                   "    higher_is_better: true\n")),
        "mulfree_shakespeare_bpb": (bpb, ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                                    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                                    "  - metric: bits_per_byte\n")),
    }
    for name, (rows, body) in specs.items():  # renamed into place: another lm-eval run may be reading them
        data = out_dir / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out_dir / f"{name}.yaml", f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                          f"    test: {data.resolve()}\ntest_split: test\n{body}")
    return out_dir


def request_cache(model_ref: str, max_length: int, eot_token_id: int | None) -> Path:
    """The database of scored requests (lm-eval's `use_cache`) for this model and scoring, in the user cache: named
    by the model's path and its files' sizes and times (a retrained dir gets a new one) and the scoring settings."""
    from mulfree.models.pretrained import cache_dir

    path = Path(model_ref)
    identity: list[Any] = [model_ref]
    if path.exists():
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        identity = [str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps([identity, max_length, eot_token_id]).encode()).hexdigest()[:16]
    return cache_dir() / "lm_eval_requests" / f"{key}_rank0.db"


def cached_requests(db: Path) -> int:
    """How many scored requests `db` holds; a file that is not a readable request database (torn, foreign) is
    removed and counts 0."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            if con.execute("PRAGMA quick_check").fetchone() == ("ok",):
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                return con.execute("SELECT count(*) FROM unnamed").fetchone()[0] if "unnamed" in tables else 0
    except sqlite3.DatabaseError:
        pass
    db.unlink()
    return 0


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: list[str], task_dir: Path, limit: int | None = None,
                max_length: int = 1024, eot_token_id: int | None = None,
                cache: Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate with lm-eval's `simple_evaluate` (`MulfreeLM` arguments as given); returns {task: {metric: value}}.
    With `cache` (a `..._rank0.db` path) every scored request is stored there as it is scored and read back
    instead of scored again: an interrupted run continues."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # lm-eval's own task index takes ~15 s to build: only when a task is not one of ours
    manager = TaskManager(include_path=str(task_dir), include_defaults=not set(tasks) <= set(OFFLINE_TASKS))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MulfreeError(f"unknown lm-eval tasks {unknown}", f"offline tasks: {', '.join(OFFLINE_TASKS)}")
    try:
        results = lm_eval.simple_evaluate(model=MulfreeLM(model, tokenizer, max_length, eot_token_id), tasks=tasks,
                                          task_manager=manager, limit=limit, bootstrap_iters=0,
                                          use_cache=None if cache is None else str(cache).removesuffix("_rank0.db"))
    except ConnectionError:  # the datasets library, offline, for a Hub task that is not in the local cache
        hub = [t for t in tasks if t not in OFFLINE_TASKS]
        raise MulfreeError(f"lm-eval task(s) {', '.join(hub)} need a download of their Hub dataset, and mulfree "
                           "runs offline", f"use the offline tasks {', '.join(OFFLINE_TASKS)}, or run once with "
                           "HF_DATASETS_OFFLINE=0 to let lm-eval download it") from None
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in results["results"].items()}
