"""The one output rule of every command that writes: build the result under a temporary name beside the
target and rename it into place; never delete or overwrite a non-empty directory unless asked to
(`--overwrite`), and then keep the old one until the new one is complete; never write into the current
directory or one above it; a file path that names a directory is a one-line error.

API (all errors are one-line `ConfigError` / `CheckpointError` naming the path and what to do):
    prepare_output(out, "packed model", overwrite)   # early check of a directory --out, before any work
    with atomic_dir(out, overwrite) as tmp:          # fill tmp; it replaces `out` whole on success
    with atomic_dir(out, overwrite, resume_key=key):  # the same, kept after a failure for a rerun to continue
        ...
    prepare_file(args.png, "--png")                   # early check of a file output (--png / --json)
    atomic_write(path, lambda tmp: fig.savefig(tmp))  # a file, via a temp file + rename
    atomic_write_text(path, text); atomic_write_json(path, data)   # strict JSON (NaN/inf -> null)
    remove_stale_temps(run_dir)                       # drop temp files/dirs left by killed writers
    with exclusive(run_dir, "training run"):          # no other process writes run_dir meanwhile (flock)

Temporary names are `.<target name>.<8 chars>.tmp` (being written) and `.<target name>.<8 chars>.old`
(a replaced directory, removed once the new one is in place); nothing else is ever removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from mulfree.errors import CheckpointError, ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)
# Files that mark a directory as a model or a training run (never written into by another command).
MODEL_MARKERS = ("config.json", "model.safetensors")
RUN_MARKERS = ("checkpoint.json", "train_config.json")
OUTPUT_MARKERS = ("checksums.json", "demo.json")  # token shards, a demo and other dirs only mulfree writes
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|old)$")


def is_temp_name(name: str) -> bool:
    """True for the names this module gives its temporary files and directories."""
    return _TEMP.match(name) is not None


def shown_name(path: str | Path) -> str:
    """The name to show users for `path`: a temporary sibling's target name (`.run.ab12cd34.tmp` -> `run`)."""
    name = Path(path).name
    m = _TEMP.match(name)
    return m["name"] if m else name


def describe_dir(path: str | Path) -> str | None:
    """What a directory holds, for messages: 'a training run', 'a model', 'a mulfree output', 'N other entries',
    or None if empty."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = [p.name for p in path.iterdir()]
    if not entries:
        return None
    if any(m in entries for m in RUN_MARKERS):
        return "a training run"
    if any(m in entries for m in MODEL_MARKERS):
        return "a model"
    if any(m in entries for m in OUTPUT_MARKERS):
        return "a mulfree output"
    return f"{len(entries)} other entr{'y' if len(entries) == 1 else 'ies'}"


def _check_replaceable(path: Path, held: str, kind: str) -> None:
    """`--overwrite` replaces a model, a run or another output of this tool, never a directory of other things
    (`--out runs` for `--out runs/x` would have deleted every run in it)."""
    if held.endswith(("entry", "entries")):
        raise CheckpointError(f"output '{path}' holds {held}, not a model, a run or other mulfree output, so "
                              "--overwrite does not replace it",
                              f"choose a new directory for the {kind} (or empty this one yourself)")


def check_not_inside(source: str | Path, out: str | Path, what: str = "the --model it reads") -> None:
    """ConfigError when the output dir `out` is, or holds, the input `source` (replacing it deletes the input)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst or dst in src.parents:
        raise ConfigError(f"--out '{out}' is or holds {what}, '{source}'", "write the output to a new directory")


def _check_not_cwd(path: Path) -> None:
    """Refuse the current directory, any directory above it, and the home directory."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise ConfigError(f"output '{path}' is the current directory or one above it",
                          "name a new directory, e.g. --out runs/name")


def prepare_output(path: str | Path, kind: str = "output", overwrite: bool = False) -> Path:
    """Check that directory `path` may receive a new `kind` (e.g. "model", "packed model", "training run")
    before any work is done: it must not be a file, the current directory or above it, and it must be
    absent or empty unless `overwrite` (then `atomic_dir` replaces it whole). Returns `Path(path)`."""
    path = Path(path)
    _check_not_cwd(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output '{path}' is a file, not a directory", f"name a directory for the {kind}")
    _check_parents(path, "output")
    held = describe_dir(path)
    if held is not None and not overwrite:
        raise CheckpointError(f"output '{path}' already holds {held}",
                              f"choose a new directory for the {kind} or pass --overwrite to replace it")
    if held is not None:
        _check_replaceable(path, held, kind)
    return path


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # includes UnicodeDecodeError
        return False
    return True


_SIGNATURES = {"png": lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"), "json": _is_json}


def prepare_file(path: str | Path, flag: str = "output", kind: str | None = None) -> Path:
    """Check that `path` (a --png / --json file) is not a directory and its parent is not a file; with `kind`
    ("png" or "json"), an existing file is replaced only if it is one of that kind (a plot or a table written
    before), never a file of something else (`--json README.md`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a directory", f"name a file (e.g. '{path / ('out' + path.suffix)}')")
    _check_parents(path, flag)
    if kind is not None and path.is_file():
        with open(path, "rb") as f:
            data = f.read(64 << 20)
        if not _SIGNATURES[kind](data):
            raise CheckpointError(f"{flag} '{path}' exists and is not a {kind.upper()} file, so it is not replaced",
                                  "name a new file (or remove this one yourself)")
    return path


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing parent of `path` must be a writable directory."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} '{path}': '{parent}' is a file, not a directory", "choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} '{path}': cannot write into '{parent}'", "choose a writable path")
            return


def make_dir(path: str | Path) -> Path:
    """`mkdir -p path`, with a one-line ConfigError instead of an OSError traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create '{path}' ({exc.strerror or exc})", "choose a writable path") from None
    return path


def _mkdir_parent(path: Path) -> None:
    make_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, then rename tmp onto `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    prepare_file(path)
    _mkdir_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write '{path}' ({exc.strerror or exc})", "choose a writable path") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, so it serialises as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that writes NaN / inf as null (never the invalid tokens NaN / Infinity)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write `data` as strict JSON (non-finite floats as null) atomically, with a final newline."""
    atomic_write_text(path, dumps_strict(data, indent=indent) + "\n")


LOCK_WAIT_S = 10.0  # how long a lock held by another process is waited for before that counts as a running writer
_HELD: dict[tuple[int, int], int] = {}  # (device, inode) of each directory this process holds locked -> its fd


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _lock(path: Path, shared: bool = False) -> int | None:
    """An fd holding an exclusive (or `shared`: a probe's, which other probes do not block) advisory lock (flock) on
    directory `path`; None while a conflicting lock is held (closing the fd, or the process ending, releases it);
    -1 where no lock can be taken (an unreadable dir, a file system without flock): the caller goes on unguarded,
    as before locks existed."""
    try:
        fd = os.open(path, os.O_RDONLY)  # a symlinked run dir: its target is held
    except OSError:
        return -1
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # ENOLCK, EOPNOTSUPP: not supported here
        os.close(fd)
        return -1
    return fd


def _release(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _lock_within(path: Path, wait_s: float, shared: bool = False) -> int | None:
    """`_lock`, retried for up to `wait_s` seconds (a writer killed a moment ago may still be exiting)."""
    deadline = time.monotonic() + wait_s
    while (fd := _lock(path, shared)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return fd


def _held_here(path: Path) -> bool:
    """True when this process holds directory `path` by `exclusive`."""
    try:
        return _identity(path) in _HELD
    except OSError:  # absent, or gone meanwhile
        return False


def in_use(path: str | Path, wait_s: float = 0.0) -> bool:
    """True while another process holds directory `path` by `exclusive` (a run or a temp dir it is writing), for
    longer than `wait_s` seconds."""
    if _held_here(Path(path)):
        return False
    fd = _lock_within(Path(path), wait_s, shared=True)
    if fd is None:
        return True
    _release(fd)
    return False


def _busy(path: Path, kind: str) -> ConfigError:
    return ConfigError(f"another process is writing the {kind} in '{path}'",
                       "wait for it to finish, or stop it, or choose another directory")


def check_not_in_use(path: str | Path, kind: str = "output") -> None:
    """ConfigError while another process holds directory `path` by `exclusive` (checked before reading it)."""
    if in_use(path, LOCK_WAIT_S):
        raise _busy(Path(path), kind)


@contextlib.contextmanager
def exclusive(path: str | Path, kind: str = "output") -> Iterator[Path]:
    """Hold directory `path` (made if absent) locked against other processes for the block, so that two commands
    never write one `kind` at once (a second `mulfree train --out X` while the first runs). Reentrant within a
    process (a command that trains inside its own temp dir)."""
    path = make_dir(path)
    key = _identity(path)
    if key in _HELD:
        yield path
        return
    fd = _lock_within(path, LOCK_WAIT_S)
    if fd is None:
        raise _busy(path, kind)
    _HELD[key] = fd
    try:
        yield path
    finally:
        del _HELD[key]
        _release(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, kind: str = "output",
               resume_key: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it takes the place of `path`.

    `path` must pass `prepare_output` (absent or empty, or `overwrite`). An existing directory is renamed
    aside, the new one renamed in, and only then the old one removed; on error the temp dir vanishes and
    `path` is untouched. Temp siblings of `path` that a killed earlier writer left are removed first.

    With `resume_key` (8 characters of [a-z0-9_] naming the run's settings) the temp dir is
    `.<name>.<resume_key>.tmp`: a failed or killed run's dir is kept (when not empty) and handed to the next
    run with the same key to continue from; the caller removes what in it is not worth keeping.
    """
    path = prepare_output(path, kind, overwrite)
    _mkdir_parent(path)
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if is_temp_name(entry.name) and in_use(entry, LOCK_WAIT_S):
            raise ConfigError(f"another process is writing '{path}' (in '{entry.name}')",
                              "wait for it to finish, or stop it, or choose another output")
    if resume_key is None:
        remove_stale_temps(path.parent, names={path.name})
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        tmp = path.parent / f".{path.name}.{resume_key}.tmp"
        if not is_temp_name(tmp.name):
            raise ValueError(f"resume_key must be 8 characters of [a-z0-9_], got {resume_key!r}")
        remove_stale_temps(path.parent, names={path.name}, keep={tmp.name})
        make_dir(tmp)
    try:
        with exclusive(tmp, kind):  # held through the rename: never taken for a stale temp meanwhile
            yield tmp
            os.chmod(tmp, 0o777 & ~_UMASK)
            replace_dir(tmp, path, overwrite, kind)
    finally:
        if tmp.exists() and (resume_key is None or not any(tmp.iterdir())):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, path: Path, overwrite: bool = False, kind: str = "output") -> None:
    """Rename directory `new` onto `path`: an empty or absent `path` is replaced directly; a non-empty one
    (only with `overwrite`) is renamed aside first and removed after the new one is in place."""
    held = describe_dir(path)
    if held is None:
        if path.is_dir():
            path.rmdir()
        os.replace(new, path)
        return
    if not overwrite:
        raise CheckpointError(f"output '{path}' now holds {held}",
                              f"choose a new directory for the {kind} or pass --overwrite to replace it")
    _check_replaceable(path, held, kind)
    aside = path.parent / f".{path.name}.{secrets.token_hex(4)}.old"
    os.replace(path, aside)
    os.replace(new, path)
    shutil.rmtree(aside, ignore_errors=True)


def remove_entry(path: Path, ignore_errors: bool = True) -> None:
    """Remove the file, symlink (not its target) or directory tree `path`; with `ignore_errors` what cannot be
    removed stays (otherwise the OSError is raised)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=ignore_errors)


def remove_stale_temps(directory: str | Path, names: Collection[str] | None = None,
                       keep: Collection[str] = ()) -> list[Path]:
    """Remove the temporary files and directories this tool's writers leave when killed (`.<name>.<8>.tmp`
    in `directory`, and `.<name>.<8>.old` when `<name>` itself is present), only for targets in `names`
    when given and never the entries named in `keep`; returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or entry.name in keep or (m["kind"] == "old" and not (directory / m["name"]).exists()):
            continue
        if names is not None and m["name"] not in names:
            continue
        if _held_here(entry) or in_use(entry):  # a running writer's, not a stale one (probed last: it opens the entry)
            continue
        remove_entry(entry)
        removed.append(entry)
    return removed
