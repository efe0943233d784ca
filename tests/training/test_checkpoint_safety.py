"""A kill at any moment of a checkpoint write leaves a checkpoint that ``train.resume=true`` continues from, and the
resumed run ends with the same trainable tensors as an uninterrupted one (issue 10)."""
import copy
import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator

import mtcpeft.training.trainer as train_mod
from mtcpeft.training.build import build_datasets, build_task_model
from mtcpeft.training.trainer import CHECKPOINT, STATE_FILE, Trainer, recover_checkpoint
from tasks import get_task
from support.runs import tiny_run_config, trainable

SAVE_EVERY = ["train.save_every_steps=2"]  # saves at steps 2, 4, 6 (epoch end), ...: the kill hits the one at 4


class Killed(BaseException):
    """Stands in for a kill -9: no ``except Exception`` (nor a ``finally`` that writes) may act on it."""


@pytest.fixture(scope="module")
def built(tiny_lm_dir, tmp_path_factory):
    """The tiny caption model (untrained) and its datasets, built once; each run trains a deep copy."""
    cfg = tiny_run_config(tiny_lm_dir, tmp_path_factory.mktemp("built") / "run")
    task = get_task("caption")
    torch.manual_seed(cfg.seed)
    model, tok, layout = build_task_model(cfg, task)
    data = build_datasets(cfg, task, model, tok, layout, progress=False)
    return model, data["train"][0], data["val"][0]


def trainer_for(built, cfg) -> Trainer:
    model, train_ds, val_ds = built
    return Trainer(cfg, copy.deepcopy(model), train_ds, val_ds)


@pytest.fixture(scope="module")
def uninterrupted(built, tiny_lm_dir, tmp_path_factory):
    tr = trainer_for(built, tiny_run_config(tiny_lm_dir, tmp_path_factory.mktemp("full") / "run", *SAVE_EVERY))
    tr.fit()
    return trainable(tr.acc.unwrap_model(tr.model)), tr.state.global_step


def _is_old(path) -> bool:
    name = os.path.basename(os.fspath(path))
    return name == CHECKPOINT + ".old" or name.startswith("." + CHECKPOINT + ".old.")


# where the second save is killed, and the step that resume must continue from: the newest complete checkpoint
POINTS = {
    "while accelerate writes checkpoint.tmp": 2,
    "before trainer_state.json is written": 2,
    "before checkpoint -> checkpoint.old": 4,
    "between the two renames": 4,
    "before checkpoint.old is deleted": 4,
    "half-way through deleting checkpoint.old": 4,
}


def _arm(monkeypatch, point: str, saves: list) -> None:
    """Make the second save_checkpoint raise Killed at ``point``."""
    def armed() -> bool:
        return len(saves) == 2

    real_save = Trainer.save_checkpoint

    def counting_save(self):
        saves.append(self.state.global_step)
        real_save(self)
    monkeypatch.setattr(Trainer, "save_checkpoint", counting_save)

    real_state, real_replace, real_rmtree, real_json = (Accelerator.save_state, os.replace, shutil.rmtree,
                                                        train_mod.write_json)

    def save_state(self, *a, **k):
        out = real_state(self, *a, **k)
        if armed() and point == "while accelerate writes checkpoint.tmp":
            os.remove(os.path.join(a[0] if a else k["output_dir"], "model.safetensors"))  # half written
            raise Killed(point)
        return out

    def write_json(obj, path):
        if armed() and point == "before trainer_state.json is written" and os.path.basename(path) == STATE_FILE:
            raise Killed(point)
        return real_json(obj, path)

    def replace(src, dst):
        name = os.path.basename(os.fspath(src))
        if armed() and ((point == "before checkpoint -> checkpoint.old" and name == CHECKPOINT)
                        or (point == "between the two renames" and name == CHECKPOINT + ".tmp")
                        or (point == "before checkpoint.old is deleted" and _is_old(src))):
            raise Killed(point)
        return real_replace(src, dst)

    def rmtree(path, *a, **k):
        if armed() and point == "before checkpoint.old is deleted" and _is_old(path):
            raise Killed(point)
        if armed() and point == "half-way through deleting checkpoint.old" and (
                _is_old(path) or os.fspath(path).endswith(".deleting")):
            os.remove(os.path.join(path, "model.safetensors"))  # trainer_state.json may still be there
            raise Killed(point)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(train_mod, "write_json", write_json)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_at_each_point_of_the_swap_resumes_to_the_same_tensors(point, built, uninterrupted, tiny_lm_dir,
                                                                       tmp_path, monkeypatch, capsys):
    want, steps = uninterrupted
    out = tmp_path / "run"
    saves = []
    with monkeypatch.context() as m:
        _arm(m, point, saves)
        with pytest.raises(Killed):
            trainer_for(built, tiny_run_config(tiny_lm_dir, out, *SAVE_EVERY)).fit()
    assert saves == [2, 4]
    capsys.readouterr()

    resumed = trainer_for(built, tiny_run_config(tiny_lm_dir, out, *SAVE_EVERY, "train.resume=true"))
    resumed.fit()
    printed = capsys.readouterr().out
    assert f"resumed from {out / CHECKPOINT}: epoch 1, step {POINTS[point]}" in printed, printed
    assert "starting from scratch" not in printed
    assert resumed.state.global_step == steps
    got = trainable(resumed.acc.unwrap_model(resumed.model))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    assert not (out / (CHECKPOINT + ".tmp")).exists() and not (out / (CHECKPOINT + ".old")).exists()
    assert json.loads((out / CHECKPOINT / STATE_FILE).read_text())["global_step"] == steps


# ------------------------------------------------------------------------------ recovery on its own (no training)
def _ckpt(path, step: int | None):
    """A fake checkpoint directory; ``step`` None: incomplete (no trainer_state.json)."""
    path.mkdir()
    (path / "model.safetensors").write_text("w")
    if step is not None:
        (path / STATE_FILE).write_text(json.dumps({"global_step": step}))


# (tmp, checkpoint, old) as a kill leaves them: step of a complete one, "part" for incomplete, None for absent
STATES = [
    ((None, 2, None), 2), (("part", 2, None), 2), ((4, 2, None), 4), ((4, None, 2), 4), ((None, 4, 2), 4),
    ((None, 4, "part"), 4), (("part", None, 2), 2), (("part", None, None), None), ((None, None, None), None),
    ((4, 2, 1), 4),
]


@pytest.mark.parametrize("dirs, newest", STATES)
def test_recovery_keeps_the_newest_complete_checkpoint_even_if_killed_itself(dirs, newest, tmp_path, monkeypatch):
    names = (CHECKPOINT + ".tmp", CHECKPOINT, CHECKPOINT + ".old")
    real_replace, real_rmtree = os.replace, shutil.rmtree
    for kill_at in range(8):  # let recovery run k renames/deletions, then kill it; then recover again
        out = tmp_path / str(kill_at)
        out.mkdir()
        for name, step in zip(names, dirs):
            if step is not None:
                _ckpt(out / name, None if step == "part" else step)
        calls = []

        def counted(real):
            def f(*a, **k):
                calls.append(1)
                if len(calls) > kill_at:
                    raise Killed()
                return real(*a, **k)
            return f
        with monkeypatch.context() as m:
            m.setattr(os, "replace", counted(real_replace))
            m.setattr(shutil, "rmtree", counted(real_rmtree))
            try:
                recover_checkpoint(out)
            except Killed:
                pass
        got = recover_checkpoint(out)
        left = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if newest is None:
            assert got is None and left == []
        else:
            assert left == [CHECKPOINT]
            assert json.loads((out / CHECKPOINT / STATE_FILE).read_text())["global_step"] == newest
