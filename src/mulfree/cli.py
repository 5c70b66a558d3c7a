"""The `mulfree` command. Each subcommand group lives in `mulfree.commands.<group>`, which
defines `register(subparsers)`; handlers import their heavy modules lazily so `--help` is fast."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import MutableMapping

from mulfree.errors import MulfreeError

# One module per group of subcommands (see DESIGN.md "Public names").
COMMAND_MODULES = ("core", "demo", "pack", "convert", "quantize", "lmul", "energy", "arith", "lmeval", "serve")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the project's one-line format, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mulfree", description="Multiplication-free language models on ordinary CPUs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"mulfree.commands.{name}").register(sub)
    return parser


def set_openmp_waiting(env: MutableMapping[str, str]) -> None:
    """Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, so that on a machine whose cores
    are busy they do not take the cores from the threads doing the work (docs/mmfree.md, threads under load). A
    user's own OMP_WAIT_POLICY, or GOMP_SPINCOUNT (a bounded spin: faster on an idle host, docs/integration.md),
    is left to OpenMP as it is."""
    if "GOMP_SPINCOUNT" not in env:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command stops as it does on Ctrl-C: its temporary outputs
    removed, a run resumable from its last checkpoint."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


_STORAGE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exhausted",
            errno.EROFS: "the file system is read-only", errno.EIO: "an I/O error on the device"}


def backend_error(exc: BaseException) -> str | None:
    """The kernels' refusal of a MULFREE_BACKEND value, as its one line (None for anything else)."""
    kernels = sys.modules.get("mulfree.kernels")
    return str(exc) if kernels is not None and isinstance(exc, kernels.BackendError) else None


def storage_error(exc: BaseException) -> str | None:
    """The one-line error for a write the storage refused (a full disk, a quota, a read-only or failing device):
    an OSError, or a safetensors error that carries the OS error number in its text; None for anything else."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found[1]) if found else None
    if code not in _STORAGE:
        return None
    where = f" writing '{exc.filename}'" if isinstance(exc, OSError) and exc.filename else ""
    return f"{_STORAGE[code]}{where}; free some space (or fix the device) and run the command again"


def main(argv: list[str] | None = None) -> int:
    from mulfree import offline

    offline.setup()
    set_openmp_waiting(os.environ)
    parser = build_parser()
    for arg in sys.argv[1:] if argv is None else argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes that are not UTF-8 reach argv as lone surrogates
            shown = os.fsencode(arg).decode("utf-8", "backslashreplace")
            sys.stderr.write(f"error: argument '{shown}' is not valid UTF-8 (character {exc.start}); mulfree takes "
                             "UTF-8 text and paths (the tokenizer and weight readers need them)\n")
            return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        result = args.func(args)
    except MulfreeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except Terminated:
        sys.stderr.write("terminated\n")
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # whoever read our output left (`mulfree generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail again
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # a full disk, a bad MULFREE_BACKEND: one line, not a traceback; anything else propagates
        message = storage_error(exc) or backend_error(exc)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(result or 0)
