"""Run every hostile-input case and write the table of docs/reliability.md (what was tried -> outcome).

    python tests/hostile/render.py docs/reliability.md
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostile import build_fixtures, check, run_case
from hostile.cases import all_cases

HEADER = """# Reliability: hostile inputs

Every value a user or a client can send is normal input. Each row below is one case of `tests/hostile/`
(run by `tests/test_hostile.py` in the test suite); this page is written by
`python tests/hostile/render.py docs/reliability.md` from a real run of every case. "ok" means the
outcome is the one the case expects: a one-line `error: ...` with exit code 2, or a correct result.
`{tmp}` is the case's own directory, `{model}`, `{run}`, `{packed}` and `{data}` a tiny trained model, its
training run, its packed dir and a text folder (copied into `{tmp}` when a case damages them).

Besides these cases:
- **Nothing lost**: every `--out` is checked before any work (`atomic.prepare_output`): a non-empty directory
  needs `--overwrite`, and then the old output stays until the new one is complete; `--overwrite` replaces only a
  model, a run or another output of mulfree, never a folder of other things nor a directory holding the input
  (before: `mulfree pack --model runs/mm --out runs --overwrite` deleted `runs`, the source model with it); a
  `--png` / `--json` file output replaces an existing file only if it is a PNG / JSON file (before: `mulfree energy
  --json README.md` overwrote the README); the current directory,
  its parents and home are never replaced; files are built beside their target and renamed into place;
  model, packed, quantized, checkpoint and GGUF-cache directories carry `checksums.json` (xxh3-64), verified
  on load (`tests/test_atomic.py`, `tests/test_integrity.py`, `tests/test_schema.py`). SIGTERM stops a command as
  Ctrl-C does (exit 143, "terminated", its temporary output removed; before, a `mulfree demo` told to stop left its
  `.demo.*.tmp` behind), and a writer removes the temporary siblings of its own target that a killed earlier run
  left (`tests/test_cli_core.py`, `tests/test_atomic.py`). A reader that leaves (`mulfree generate ... | head -c
  8`) stops a command quietly with SIGPIPE's status, 141 (before: a `BrokenPipeError` traceback, exit 1).
- **Two commands, one output**: a training run's directory and every temporary output directory are held with an
  advisory lock (`flock`, `atomic.exclusive`) while a command writes them. A second `mulfree train --out R` (or
  `--resume`, or `--overwrite`) while one runs in `R`, a second `mulfree demo`, pack or quantize of the same
  `--out`: `error: another process is writing ...`, exit 2, before any work; a running writer's temp dir is never
  removed as a stale one (before: two `train --out R` both exited 0 with their steps interleaved in one
  `metrics.jsonl` and one checkpoint series; `tests/test_atomic.py`).
- **Big inputs**: `mulfree train`, `eval` and `generate` encode a long text in pieces (cut where byte-level BPE
  splits anyway: the same ids, `tests/test_resolve.py`; the bundled 4.8 MB corpus gives the same 1,568,903), and
  `eval` stops at `--max-tokens`: a 50 MB file with `--max-tokens 10000` took
  95 s and 9.4 GB of memory, now 8.8 s and 0.6 GB (host A; the same perplexity); `generate --prompt-file` reads at
  most 16 MiB.
- **A full disk**: a write the storage refuses (no space, a quota, a read-only or failing device: an `OSError`, or
  the safetensors writer's error carrying the OS error number) ends any command with one line, `error: no space
  left on the device ...`, exit 2, its temporary output removed (before: a traceback; checked on a 2 MiB tmpfs with
  `mulfree pack` and `mulfree train`; `tests/test_cli_core.py`).
- **Interrupted quantization continues**: a Ctrl-C, SIGTERM or `kill -9` during `mulfree quantize` keeps the
  finished blocks beside `--out`, and the same command continues from there to the same bytes (docs/shiftadd.md;
  a torn record, a truncated stream file or other settings start over; `tests/test_quantize_blockwise.py`).
  `mulfree arith train` likewise (it lost the whole run, up to 30 CPU-minutes, before): it checkpoints every tenth
  of its steps into a build dir named by its settings, kept after a Ctrl-C or SIGTERM, and the same command
  continues to the weights and results of an uninterrupted run (`tests/test_arith_train.py`). `mulfree lm-eval`
  stores each scored request as it is scored (lm-eval's request cache, in `$MULFREE_CACHE/lm_eval_requests`, named
  by the model's files and the scoring settings): after a Ctrl-C at 318 of 2,500 requests the same command scored
  the other 2,182 and gave the uninterrupted results; the cache is removed when the run completes, and an
  unreadable one is dropped (`tests/test_lmeval.py`).
- **Kill anywhere**: `python benchmarks/crash_resume.py --kills 50 --seed 1` (AMD EPYC, 2 vCPUs): 50 `kill -9`
  at random moments of a tiny 40-step training run over 4 runs, 49 resumes, 0 failed restarts, 4/4 runs
  identical to the uninterrupted one (every loss and weight), 1 kill left a half-written temp file that the
  next resume removed, none left at the end; 179 s. `--seed 0`: 50 kills over 3 runs, the same outcome.
  `tests/test_crash_resume.py` runs 2 kills in the suite.
- **HTTP clients** (`tests/test_serve_api.py`, the official `openai` client and raw sockets against a real
  server on 127.0.0.1): NaN / inf sampling values, huge seeds, wrong types (a string for a boolean, booleans or
  floats as token ids), malformed JSON, invalid UTF-8, lone UTF-16 surrogates escaped in JSON (`"\\ud800"`, in a
  prompt or a chat message: the tokenizer raised a TypeError, a 500, until this was found), a 5,000-digit number
  and 30,000 levels of nesting under the size limit (Python's JSON reader raised, a 500), a body over the limit
  (announced or streamed), an unknown model, `stop: 5`, a full queue, disconnects mid-stream and before the
  answer (the slot is freed within one step), a request that fails inside the loop and a loop that dies (503
  on `/health`): each answers a 4xx JSON error or cancels cleanly, and the server keeps serving. Errors on
  union-typed fields (`prompt`, `stop`, chat `content`) name the broken constraint (`prompt.0: Input should be
  greater than or equal to 0`) or what the field takes, not the first alternative's type error (`prompt.str:
  Input should be a valid string` for a list of token ids).
  Requests h11 cannot parse (a negative, doubled or non-numeric Content-Length, a malformed chunk, a 200 KB
  header, bytes that are not HTTP) answer a JSON 400 (`bad_http_request`; uvicorn's own answer was plain text);
  a 60 KB path or model name is cut to 100 characters where an error repeats it (it was sent back whole), and
  `/health`'s live count returns to 0 once requests finish (it kept the last ones while the loop waited).
  SIGTERM during a 200-request burst with `--shutdown-timeout 3`: 49 finished, 151 got a 503 JSON ("the server is
  shutting down") 3.2 s after the signal, the process gone at 3.8 s, no traceback (before: 131 plain-text 500s and
  a traceback each in the log, from uvicorn cancelling their tasks). A model dir whose chat template does not compile
  or whose tokenizer_config.json is not JSON: `mulfree serve` stops at start-up with one line, exit 2 (before: a
  Jinja traceback, or the plain template used silently; and nanobind's leak report of the loaded engine after the
  error, now off).
  Also tried by hand and already answered (400): `n` 0 or 10^9, `max_tokens` −5 or 1e30, `logprobs` 1000,
  `top_logprobs` without `logprobs`, empty prompts and lists, 1,000 stop strings, `logit_bias`, `echo` with `stream`,
  `best_of`, `suffix`, tools, image parts, a list as the model, bodies that are arrays, strings or `null`.
  `tests/test_serve_idle.py` runs `mulfree serve` itself under 2,000 idle and 300 half-sent connections
  (`/health` answers a fresh connection within 1 s, a completion succeeds, every one is closed a
  `--header-timeout` later), a half head sent after a first response (closed), a body that never arrives
  (408 JSON, closed) and a client that leaves mid-body (no traceback in the log).
  With an API key (`$MULFREE_API_KEY` or `--api-key`): no `Authorization` header, `Basic` auth, an empty
  bearer, a wrong key, a key in another case, a longer one, non-ASCII header bytes, a 1 MB body with a wrong key
  (refused before it is read) → 401 JSON, `invalid_api_key`; a key set but empty or with spaces stops the server
  at start-up (`tests/test_serve_api.py`). The Responses API (`/v1/responses`): tools, `store: true`,
  `previous_response_id`, an empty input list, an image part, `max_output_tokens` 0, reasoning, a JSON
  `text.format`, an input that is a number, an unknown `include`, `top_logprobs` 21, `truncation: auto` → 400 naming the field; an
  unknown model → 404.
- **Threads sharing a model** (a deployer's own threaded app): four threads generating through one packed
  model got each other's tokens; two engines (or kernels) called from two threads at once got each other's chunks,
  crashed or hung; threads generating through one 3-bit ShiftAdd Lat. SmolLM2 hung. Each call now runs on its own
  state and callers take turns on the thread pool (`tests/test_engine.py`, `tests/test_ternary_kernels.py`,
  `tests/test_llama_lean.py`).
- **Loader fidelity**: `tests/test_official_fidelity.py` converts a tiny official-format `hgrn_bit` checkpoint
  (rms_norm_eps 1e-5, two heads, right padding and a mask hole) and matches an independent plain-torch
  reference of the official forward written in the test to 8.9e-8 (bound 1e-5).

| case | input | command | outcome |
|---|---|---|---|
"""


def main(out: str) -> int:
    cases = all_cases()
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "fixtures").mkdir()
        fixtures = build_fixtures(Path(root) / "fixtures")
        for i, case in enumerate(cases):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            outcome = run_case(case, tmp, fixtures)
            problem = check(case, outcome)
            bad += problem is not None
            line = outcome.line if case.expect else "exit 0"
            for name, path in [("tmp", tmp), *fixtures.items()]:  # stable names instead of this run's temp paths
                line = line.replace(str(path), "{" + name + "}")
            result = ("ok: " if problem is None else "WRONG: ") + line
            command = "mulfree " + " ".join(case.argv)
            row = f"| {case.id} | {case.what} | `{command}` | {result.replace('|', '/')} |"
            rows.append(os.fsencode(row).decode("utf-8", "backslashreplace"))  # argv bytes that are not UTF-8: \xff
    summary = f"\n{len(cases)} cases, {len(cases) - bad} as expected.\n"
    Path(out).write_text(HEADER + "\n".join(rows) + "\n" + summary)
    print(summary.strip())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
