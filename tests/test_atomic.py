"""The output rule: atomic directory replacement that never deletes what it was not asked to, file
outputs that refuse directories, strict JSON and stale temp removal."""

from __future__ import annotations

import json
import os

import pytest

from mulfree.atomic import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_not_in_use,
    check_not_inside,
    dumps_strict,
    exclusive,
    in_use,
    prepare_file,
    prepare_output,
    remove_stale_temps,
    shown_name,
)
from mulfree.checkpoint import check_run_dir
from mulfree.errors import CheckpointError, ConfigError


def test_atomic_dir_refuses_a_non_empty_dir_and_keeps_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    ran = False
    with pytest.raises(CheckpointError, match="--overwrite"), atomic_dir(out):
        ran = True
    assert not ran and (out / "mine.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_overwrite_replaces_whole_and_failure_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "checksums.json").write_text("2")
        raise RuntimeError("killed")
    assert os.listdir(out) == ["config.json"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "checksums.json").write_text("2")
    assert os.listdir(out) == ["checksums.json"] and os.listdir(tmp_path) == ["out"]


def test_overwrite_never_replaces_a_dir_of_other_things_or_one_holding_the_input(tmp_path):
    runs = tmp_path / "runs"  # `--out runs` where `--out runs/mm-packed` was meant
    (runs / "keep").mkdir(parents=True)
    (runs / "keep" / "notes.txt").write_text("precious")
    (runs / "mm").mkdir()
    (runs / "mm" / "config.json").write_text("{}")
    for attempt in (lambda: prepare_output(runs, "packed model", overwrite=True),
                    lambda: atomic_dir(runs, overwrite=True).__enter__()):
        with pytest.raises(CheckpointError, match=r"holds 2 other entries, not a model, a run or other mulfree"):
            attempt()
    assert (runs / "keep" / "notes.txt").read_text() == "precious"
    for out in (runs, runs / "mm"):
        with pytest.raises(ConfigError, match=r"is or holds the --model it reads"):
            check_not_inside(runs / "mm", out)
    check_not_inside(runs / "mm", runs / "mm-packed")
    check_not_inside(runs / "mm", tmp_path / "r")


def test_empty_dir_is_filled_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert os.listdir(tmp_path / "out") == ["a"]


@pytest.mark.parametrize("target", [".", "..", "~"])
def test_cwd_and_above_are_refused_even_with_overwrite(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "precious").write_text("x")
    with pytest.raises(ConfigError, match="current directory"):
        prepare_output(os.path.expanduser(target), overwrite=True)
    assert (tmp_path / "precious").exists()


def test_prepare_output_names_what_the_dir_holds(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds a model"):
        prepare_output(tmp_path / "m", "packed model")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_output(tmp_path / "f")


def test_file_outputs_refuse_directories(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        prepare_file(tmp_path, "--png")
    with pytest.raises(ConfigError, match="is a directory"):
        atomic_write_text(tmp_path, "x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_file(tmp_path / "f" / "x.json", "--json")


def test_strict_json(tmp_path):
    assert dumps_strict({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    atomic_write_json(tmp_path / "x.json", {"loss": float("-inf")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"loss": None}


def test_remove_stale_temps_only_removes_our_temp_names(tmp_path):
    (tmp_path / "model.safetensors").write_text("x")
    (tmp_path / ".model.safetensors.ab_c1234.tmp").write_text("partial")
    (tmp_path / ".ckpt-3.zz99aa00.tmp").mkdir()
    (tmp_path / ".model.safetensors.0123abcd.old").mkdir()  # a replaced dir whose target is in place
    (tmp_path / ".gone.0123abcd.old").mkdir()  # the only copy: its target is missing
    (tmp_path / ".hidden").write_text("user file")
    (tmp_path / "notes.tmp").write_text("user file")
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path)) == [".gone.0123abcd.old", ".hidden", "model.safetensors", "notes.tmp"]


def test_remove_stale_temps_can_be_limited_to_one_target(tmp_path):
    (tmp_path / ".run.ab12cd34.tmp").mkdir()
    (tmp_path / ".other.ab12cd34.tmp").mkdir()
    assert [p.name for p in remove_stale_temps(tmp_path, names={"run"})] == [".run.ab12cd34.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == [".other.ab12cd34.tmp"]


def test_atomic_dir_removes_what_a_killed_writer_of_the_same_target_left(tmp_path):
    for name in (".run.ab12cd34.tmp", ".other.ab12cd34.tmp", ".run.ab12cd34.old", "notes.txt"):
        (tmp_path / name).mkdir()
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "f").write_text("x")
    # the run's stale temp goes; another target's stays, and an .old stays while it may be the only copy
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ab12cd34.tmp", ".run.ab12cd34.old", "notes.txt",
                                                          "run"]


def test_progress_shows_the_target_name_not_the_temp_sibling(tmp_path):
    with atomic_dir(tmp_path / "run") as tmp:
        assert tmp.name != "run" and shown_name(tmp) == "run"
    assert shown_name(tmp_path / "run") == "run" and shown_name(".hidden") == ".hidden"


def test_a_dir_another_process_writes_is_refused_and_never_taken_for_stale(tmp_path, held_by_another_process):
    run = tmp_path / "run"
    held_by_another_process(run)
    with pytest.raises(ConfigError, match=f"another process is writing the training run in '{run}'"):
        check_not_in_use(run, "training run")
    with pytest.raises(ConfigError, match="another process is writing"), exclusive(run, "training run"):
        pass
    with pytest.raises(ConfigError, match="another process is writing the training run"):
        check_run_dir(run, resume=True)  # said "stopped before its first checkpoint" while the run was starting
    temp = tmp_path / ".model.ab12cd34.tmp"  # another command filling the same target
    held_by_another_process(temp)
    stale = tmp_path / ".model.zz99zz99.tmp"
    stale.mkdir()
    busy = r"another process is writing '.*model' \(in '\.model\.ab12cd34\.tmp'\)"
    with pytest.raises(ConfigError, match=busy), atomic_dir(tmp_path / "model"):
        pass
    assert remove_stale_temps(tmp_path) == [stale] and temp.is_dir()


def test_a_writer_that_is_exiting_is_waited_for(tmp_path, held_by_another_process, monkeypatch):
    held_by_another_process(tmp_path / "run", seconds=0.2)  # as a run killed a moment ago, still exiting
    monkeypatch.setattr("mulfree.atomic.LOCK_WAIT_S", 10.0)  # the default: room for a slow host
    with exclusive(tmp_path / "run", "training run"):
        pass


def test_exclusive_is_reentrant_in_one_process_and_released_after(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp, exclusive(tmp, "training run"):  # arith train trains in its temp
        assert not in_use(tmp)  # held by this process, not another
        assert remove_stale_temps(tmp_path) == [] and tmp.is_dir()
        (tmp / "model.safetensors").write_bytes(b"x")
    with exclusive(tmp_path / "out"):
        pass
    assert not in_use(tmp_path / "out")


def test_a_file_system_without_flock_goes_on_unguarded(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with atomic_dir(tmp_path / "out") as tmp, exclusive(tmp_path / "run"):
        (tmp / "a").write_text("x")
        assert not in_use(tmp_path / "run")
    assert (tmp_path / "out" / "a").read_text() == "x"


def test_a_file_output_replaces_only_a_file_of_its_kind(tmp_path):
    notes, plot, table = tmp_path / "notes.md", tmp_path / "p.png", tmp_path / "t.json"
    notes.write_text("# mine\n")
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    table.write_text('{"rows": []}')
    assert prepare_file(plot, "--png", kind="png") == plot and prepare_file(table, "--json", kind="json") == table
    assert prepare_file(tmp_path / "new.png", "--png", kind="png")  # absent: fine
    for path, kind in ((notes, "json"), (notes, "png"), (table, "png"), (plot, "json")):
        with pytest.raises(CheckpointError, match=f"exists and is not a {kind.upper()} file"):
            prepare_file(path, "--out", kind=kind)
    assert notes.read_text() == "# mine\n"

