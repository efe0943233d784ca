"""Output folders: nothing already written is lost, a bad folder is refused before any work (issue 10)."""
import json
import os
from pathlib import Path

import pytest
import yaml

from support.cli import error_lines, load_script, run_script
from conftest import tiny_overrides
from mtcpeft.io import UnsafeWriteError, atomic_dir, check_output_dir, prepare_run_dir, swap_dir
from support.plugins import plugin_pair as _pair


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def finished_run(d: Path) -> Path:
    """What a finished training leaves (contents are stand-ins: nothing is loaded before the refusal)."""
    for name in ("plugin/plugin.json", "plugin/adaptor.safetensors", "checkpoint/trainer_state.json",
                 "results.json", "config.yaml", "tb/events.out.tfevents.1"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(name)
    return d


def one_error(code, err) -> str:
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ the helpers
def test_a_new_run_refuses_a_previous_one_unless_resumed_or_overwritten(tmp_path):
    run = finished_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    with pytest.raises(UnsafeWriteError, match=r"holds a previous run \(checkpoint, plugin, results.json\); continue "
                                               r"it with train.resume=true, replace it with --overwrite"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert snapshot(run) == before
    assert prepare_run_dir(run, resume=True, overwrite=False) == run and snapshot(run) == before
    with pytest.raises(UnsafeWriteError, match="pass one of them"):
        prepare_run_dir(run, resume=True, overwrite=True)
    prepare_run_dir(run, resume=False, overwrite=True, check_only=True)  # a plan: nothing removed yet
    assert snapshot(run) == before
    prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(snapshot(run)) == ["config.yaml", "notes.txt"]  # the previous results and events went; notes stay


def test_a_new_run_refuses_files_it_did_not_write_but_not_its_own(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafeWriteError, match=r"holds files mtcpeft did not write \(thesis.tex\)"):
        prepare_run_dir(home, resume=False, overwrite=False)
    prepare_run_dir(home, resume=False, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
    # what a run (or a sweep) left before its first checkpoint is not in the way
    swept = tmp_path / "swept"
    for name in ("config.yaml", "sweep.log", "sweep_run.json", "features/train.safetensors", "tb/x"):
        (swept / name).parent.mkdir(parents=True, exist_ok=True)
        (swept / name).write_text("")
    assert prepare_run_dir(swept, resume=False, overwrite=False) == swept


def test_atomic_dir_replaces_only_what_it_rewrites(tmp_path):
    out = tmp_path / "plugin"
    for content in ("one", "two"):  # a plugin over a plugin
        with atomic_dir(out) as tmp:
            (tmp / "plugin.json").write_text(content)
    assert (out / "plugin.json").read_text() == "two"
    (out / "mine.txt").write_text("mine")
    with pytest.raises(UnsafeWriteError, match="holds mine.txt, which replacing it would delete"):
        with atomic_dir(out) as tmp:
            (tmp / "plugin.json").write_text("three")
    assert sorted(os.listdir(out)) == ["mine.txt", "plugin.json"] and (out / "plugin.json").read_text() == "two"
    (tmp_path / "x.old").mkdir()  # a folder of the user's that an old implementation renamed onto and deleted
    (tmp_path / "x.old" / "keep").write_text("k")
    for _ in range(2):
        with atomic_dir(tmp_path / "x") as tmp:
            (tmp / "plugin.json").write_text("{}")
    assert (tmp_path / "x.old" / "keep").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugin", "x", "x.old"]  # no temporaries left


def test_check_output_dir(tmp_path):
    produces = ("plugin.json", "adaptor.safetensors")
    assert check_output_dir(tmp_path / "new", produces, overwrite=False, what="plugin") == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(UnsafeWriteError, match="is an existing file"):
        check_output_dir(tmp_path / "f", produces, overwrite=True, what="plugin")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "plugin.json").write_text("{}")
    with pytest.raises(UnsafeWriteError, match="already holds a plugin; pass --overwrite"):
        check_output_dir(tmp_path / "p", produces, overwrite=False, what="plugin")
    check_output_dir(tmp_path / "p", produces, overwrite=True, what="plugin")
    (tmp_path / "p" / "a.txt").write_text("")
    with pytest.raises(UnsafeWriteError, match="holds a.txt, which writing the plugin there would delete"):
        check_output_dir(tmp_path / "p", produces, overwrite=True, what="plugin")


# ----------------------------------------------------------------------------------- the scripts, in-process
def _no_build(monkeypatch, module, *names):
    def boom(*a, **k):
        raise AssertionError("the output folder must be checked before anything is built")
    for name in names:
        monkeypatch.setattr(module, name, boom)
    return module


def test_train_task_into_a_finished_run_refuses_before_building(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    module = _no_build(monkeypatch, load_script("train_task.py"), "build_task_model")
    line = one_error(*run_script("train_task.py", ["--task", "caption", *tiny_overrides(tiny_lm_dir, out)], capsys,
                                 module)[::2])
    assert line.startswith(f"error: output_dir {out} holds a previous run") and "--overwrite" in line
    assert snapshot(out) == before


def _sys_dir():
    probe = Path("/sys/mtcpeft-write-test")
    try:
        probe.mkdir()
    except OSError:
        return probe
    probe.rmdir()
    return None


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_train_task_output_dir_that_cannot_be_written_is_one_line_before_building(case, tiny_lm_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    (tmp_path / "file").write_text("mine")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "read-only": _sys_dir()}[case]
    if out is None:
        pytest.skip("no read-only filesystem to write to here")
    module = _no_build(monkeypatch, load_script("train_task.py"), "build_task_model")
    line = one_error(*run_script("train_task.py", ["--task", "caption", *tiny_overrides(tiny_lm_dir, out)], capsys,
                                 module)[::2])
    assert line.startswith("error: output_dir" if case == "a file" else "error: cannot write to output_dir"), line
    assert (tmp_path / "file").read_text() == "mine"


def test_train_joint_into_a_finished_run_refuses_before_building(tmp_path, capsys, monkeypatch):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    module = _no_build(monkeypatch, load_script("train_joint.py"), "load_model")
    line = one_error(*run_script("train_joint.py", ["--plugin", tmp_path / "unified", "--tasks", "vqa",
                                                    f"output_dir={out}"], capsys, module)[::2])
    assert "holds a previous run" in line and snapshot(out) == before
    line = one_error(*run_script("train_joint.py", ["--plugin", out / "plugin", "--tasks", "vqa", "--overwrite",
                                                    f"output_dir={out}"], capsys, module)[::2])
    assert "lies inside output_dir" in line and snapshot(out) == before


def test_merge_never_replaces_user_files_or_its_sources(tmp_path, capsys):
    _, cdir, _, qdir = _pair(tmp_path)
    plugins = [f"--plugin=caption={cdir}", f"--plugin=qa={qdir}"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    sources = snapshot(cdir)
    for out, extra, message in [(mine, [], "holds notes.txt, which writing the plugin there would delete"),
                                (mine, ["--overwrite"], "holds notes.txt"),
                                (cdir, [], "is the source plugin caption"),
                                (cdir, ["--overwrite"], "is the source plugin caption")]:
        line = one_error(*run_script("merge.py", [*plugins, "--out", out, *extra], capsys)[::2])
        assert message in line, line
    assert (mine / "notes.txt").read_text() == "mine" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert snapshot(cdir) == sources
    out = tmp_path / "unified"
    assert run_script("merge.py", [*plugins, "--out", out], capsys)[0] == 0
    first = snapshot(out)
    line = one_error(*run_script("merge.py", [*plugins, "--out", out], capsys)[::2])
    assert "already holds a plugin; pass --overwrite" in line and snapshot(out) == first
    spec = tmp_path / "spec.yaml"  # the spec's out is checked the same way
    spec.write_text(yaml.safe_dump({"plugins": {"caption": str(cdir), "qa": str(qdir)}, "out": str(cdir)}))
    assert "is the source plugin caption" in one_error(*run_script("merge.py", ["--spec", spec], capsys)[::2])
    assert run_script("merge.py", [*plugins, "--out", out, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "plugin.json").read_text())["task"] == "unified"


def test_export_peft_never_replaces_user_files(tmp_path, capsys):
    _, _, _, qdir = _pair(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    args = ["--plugin", qdir, "--context", "answer", "--out"]
    for out in (mine, qdir):  # a folder of the user's; the source plugin itself
        before = snapshot(out)
        for extra in ([], ["--overwrite"]):
            assert "which writing the PEFT adapter there would delete" in one_error(
                *run_script("export_peft.py", [*args, out, *extra], capsys)[::2])
            assert snapshot(out) == before
    peft = tmp_path / "peft"
    assert run_script("export_peft.py", [*args, peft], capsys)[0] == 0
    assert "already holds a PEFT adapter" in one_error(*run_script("export_peft.py", [*args, peft], capsys)[::2])
    assert run_script("export_peft.py", [*args, peft, "--overwrite"], capsys)[0] == 0


def test_train_parallel_checks_every_run_dir_before_starting(tmp_path, capsys):
    finished_run(tmp_path / "par" / "qa")
    argv = ["--tasks", "caption,qa", "--out", tmp_path / "par", "--dry-run"]
    line = one_error(*run_script("train_parallel.py", argv, capsys)[::2])
    assert line.startswith("error: run 'qa': output_dir") and "holds a previous run" in line
    code, result, _ = run_script("train_parallel.py", [*argv, "--overwrite"], capsys)
    assert code == 0 and all("--overwrite" in cmd for cmd in result["plans"])
    assert run_script("train_parallel.py", [*argv, "--", "train.resume=true"], capsys)[0] == 0
    assert (tmp_path / "par" / "qa" / "plugin" / "plugin.json").is_file()  # a plan removes nothing


def test_resume_with_another_adaptor_config_names_what_differs(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "caption", *tiny_overrides(tiny_lm_dir, out), "train.mixed_precision=no", "train.epochs=1"]
    assert run_script("train_task.py", [*args, "adaptor.rank=8"], capsys)[0] == 0
    before = snapshot(out / "checkpoint")
    line = one_error(*run_script("train_task.py", [*args, "train.resume=true", "adaptor.rank=4"], capsys)[::2])
    assert line.startswith(f"error: the checkpoint in {out / 'checkpoint'} was made with another model or adaptor "
                           "config"), line
    assert "lora_A is [2, 8, " in line and "config keys that differ: adaptor.rank=8 (now 4)" in line, line
    assert snapshot(out / "checkpoint") == before
    assert yaml.safe_load((out / "config.yaml").read_text())["adaptor"]["rank"] == 8  # the run's config is kept


def test_swap_dir_replaces_by_renames_and_leaves_nothing_else(tmp_path):
    for aside in (None, tmp_path / "dest.old"):
        (tmp_path / "dest").mkdir(exist_ok=True)
        (tmp_path / "dest" / "old.txt").write_text("old")
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "new.txt").write_text("new")
        swap_dir(tmp_path / "new", tmp_path / "dest", aside)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # the old copy is gone, wherever it went
        assert [p.name for p in (tmp_path / "dest").iterdir()] == ["new.txt"]
    swap_dir(tmp_path / "dest", tmp_path / "fresh")  # into a new name: a plain rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]
