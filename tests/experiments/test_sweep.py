"""Ablation sweeps (mtcpeft/experiments/sweep*.py, mtcpeft/experiments/plots.py, launch/sweep.py): sweep-file
expansion and checks, resume of a half-finished sweep, the results tables and plots, and one real two-run sweep of
a tiny model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_overrides
from support.sweeps import BASE, FakeTrainer, called, sweep_file
from mtcpeft.experiments.plots import COLOURS, make_plots
from mtcpeft.experiments.sweep import plan_runs, run_sweep
from mtcpeft.experiments.sweep_results import collect_rows
from mtcpeft.experiments.sweep_spec import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ expansion
def test_table1_expands_to_30_points_of_3_seeds_each(tmp_path):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "table1.yaml", out=tmp_path)
    plans = plan_runs(sweep)
    assert len(plans) == 90 and len({p.name for p in plans}) == 90 and len({p.point for p in plans}) == 30
    assert sweep.base == BASE and sweep.task == "caption" and sweep.plots == ["bars"] and sweep.seeds == [0, 1, 2]
    assert all(p.config.seed == p.seed and p.name == f"{p.point}_s{p.seed}" for p in plans)
    assert {p.pair for p in plans} == {f"{a}_{t}" for a in ("ia3", "bitfit", "lora-1", "lora-8", "lora-64")
                                       for t in ("A", "F", "AF")}
    got = {(p.config.adaptor.kind, p.config.adaptor.rank if p.config.adaptor.kind == "lora" else None,
            p.config.adaptor.targets, p.config.adaptor.context_agnostic) for p in plans}
    kinds = [("ia3", None), ("bitfit", None), ("lora", 1), ("lora", 8), ("lora", 64)]
    assert got == {(k, r, t, a) for k, r in kinds for t in ("A", "F", "AF") for a in (True, False)}
    lora8 = next(p for p in plans if p.name == "lora-8_AF_specific_s1")
    spec = lora8.config.adaptor
    assert (spec.kind, spec.rank, spec.context_agnostic, lora8.config.seed) == ("lora", 8, False, 1)
    assert lora8.output_dir == tmp_path / "lora-8_AF_specific_s1" and lora8.config.output_dir == str(lora8.output_dir)
    # the shared budget reached every run, the base config the rest
    assert all((p.config.data.train_limit, p.config.data.val_limit, p.config.train.epochs) == (200, 80, 1)
               for p in plans)
    assert all(p.config.model.lm == "smollm2" and p.action == "train" for p in plans)


def test_rank_sweep_is_lora_af_specific_over_seven_ranks(tmp_path):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "rank.yaml", out=tmp_path)
    plans = plan_runs(sweep)
    assert [(p.config.adaptor.rank, p.seed) for p in plans] == [(r, s) for r in (1, 2, 4, 8, 16, 32, 64)
                                                                for s in (0, 1, 2)]
    assert {(p.config.adaptor.kind, p.config.adaptor.targets, p.config.adaptor.context_agnostic) for p in plans} == {
        ("lora", "AF", False)}
    assert sweep.plots == ["rank"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_open_with_their_command_and_plan(path, tmp_path):
    head = "".join(path.read_text().splitlines(keepends=True)[:10])
    assert head.startswith("#") and f"python launch/sweep.py --config configs/sweeps/{path.name}" in head
    assert plan_runs(load_sweep(path, out=tmp_path))


def test_runs_list_and_dotted_axes(tmp_path):
    path = sweep_file(tmp_path, {"runs": [{"adaptor": "lora-4", "targets": "A", "train.lr": 0.003},
                                          {"adaptor": "ia3", "targets": "F", "train.lr": 0.0003, "name": "mine"}]})
    plans = plan_runs(load_sweep(path))
    assert [p.name for p in plans] == ["lora-4_A_lr0.003", "mine"]
    assert [p.config.train.lr for p in plans] == [0.003, 0.0003]
    assert [(p.config.adaptor.kind, p.config.adaptor.rank) for p in plans] == [("lora", 4), ("ia3", 8)]


def test_full_and_frozen_rows_of_table1_are_adaptor_axis_values(tmp_path):
    path = sweep_file(tmp_path, {"grid": {"adaptor": ["full", "none", "lora-8"], "targets": ["AF"]}})
    plans = plan_runs(load_sweep(path))
    assert [p.name for p in plans] == ["full_AF", "none_AF", "lora-8_AF"]
    assert [(p.config.train.mode, p.config.adaptor.kind) for p in plans] == [
        ("full", "none"), ("adaptors", "none"), ("adaptors", "lora")]
    assert [r["adaptor"] for r in collect_rows(plans)] == ["full", "none", "lora"]


def test_axis_values_win_over_shared_and_command_line_overrides(tmp_path):
    path = sweep_file(tmp_path, {"overrides": ["adaptor.rank=3", "train.lr=0.5"], "grid": {"adaptor": ["lora-16"]}})
    (plan,) = plan_runs(load_sweep(path), ["adaptor.rank=5", "train.lr=0.25"])
    assert plan.config.adaptor.rank == 16 and plan.config.train.lr == 0.25


@pytest.mark.parametrize("body, message", [
    ({"grid": {"adapter": ["ia3"]}}, "unknown sweep axis 'adapter'; did you mean 'adaptor'?"),
    ({"grids": {"adaptor": ["ia3"]}}, "unknown key 'grids'; did you mean 'grid'?"),
    ({"grid": {"adaptor": ["lora-x"]}}, "written lora-R with R >= 1"),
    ({"grid": {"adaptor": ["ia3-4"]}}, "only LoRA takes a rank"),
    ({"grid": {"agnostic": ["maybe"]}}, "agnostic value 'maybe' must be true or false"),
    ({"grid": {"rank": [0]}}, "rank value 0 must be an integer >= 1"),
    ({"grid": {"adaptor": []}}, "needs a non-empty list"),
    ({"grid": {"adaptor": ["ia3"]}, "runs": [{"adaptor": "ia3"}]}, "exactly one of grid"),
    ({}, "exactly one of grid"),
    ({"runs": [{"adaptor": "ia3"}, {"adaptor": "ia3"}]}, "would share a directory"),
    ({"grid": {"adaptor": ["ia3"]}, "plot": "pie"}, "plot 'pie' is not one of bars, rank"),
])
def test_bad_sweep_files_fail_with_a_clear_error(tmp_path, body, message):
    with pytest.raises(SweepError, match=message.replace("?", r"\?").replace("[", r"\[")):
        plan_runs(load_sweep(sweep_file(tmp_path, body)))


@pytest.mark.parametrize("body, overrides, message", [
    ({"grid": {"train.lrr": [0.1]}}, [], "run lrr0.1: unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ({"grid": {"adaptor": ["loha"]}}, [], "run loha: config key 'adaptor.kind' must be one of"),
    ({"grid": {"adaptor": ["ia3"]}}, ["output_dir=x"], "the sweep sets output_dir itself"),
    ({"grid": {"adaptor": ["ia3"]}}, ["train.resume=true"], "the sweep sets train.resume itself"),
])
def test_bad_run_configs_fail_before_any_training(tmp_path, body, overrides, message):
    sweep = load_sweep(sweep_file(tmp_path, body))
    trainer = FakeTrainer(tmp_path, PPL, PARAMS)
    with pytest.raises(SweepError, match=message.replace("?", r"\?")):
        run_sweep(sweep, overrides, command=trainer.command, echo=lambda s: None)
    assert trainer.calls == []


def test_base_is_required_and_read_from_the_sweep_folder(tmp_path):
    (tmp_path / "s.yaml").write_text("grid: {adaptor: [ia3]}\n")
    with pytest.raises(SweepError, match="base .* is required"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "base.yaml").write_text("task: caption\ntrain:\n  epochs: 7\n")
    (tmp_path / "s.yaml").write_text("base: base.yaml\ngrid: {adaptor: [ia3]}\n")
    sweep = load_sweep(tmp_path / "s.yaml")
    assert sweep.base == tmp_path / "base.yaml" and sweep.out == Path("runs/sweeps/s")
    assert plan_runs(sweep)[0].config.train.epochs == 7


# ------------------------------------------------------------------------------------- resume and tables
PPL = {"ia3_A_agnostic": 4.25, "ia3_A_specific": 4.0, "lora-8_A_agnostic": 3.5, "lora-8_A_specific": 3.125}
PARAMS = {"ia3_A_agnostic": 1234, "ia3_A_specific": 2468, "lora-8_A_agnostic": 98765, "lora-8_A_specific": 197530}


def test_resume_reruns_only_missing_failed_and_crashed_runs(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["ia3", "lora-8"], "targets": ["A"],
                                                      "agnostic": [True, False]}}))
    first = FakeTrainer(tmp_path, PPL, PARAMS, fail={"ia3_A_specific"}, crash={"lora-8_A_agnostic"},
                        oom={"ia3_A_agnostic"})
    rows = run_sweep(sweep, ["train.max_steps=3"], command=first.command, echo=lambda s: None)
    assert len(first.calls) == 4  # every failure was recorded and the sweep went on
    assert {r["run"]: r["status"] for r in rows} == {"ia3_A_agnostic": "failed", "ia3_A_specific": "failed",
                                                     "lora-8_A_agnostic": "failed", "lora-8_A_specific": "ok"}
    errors = {r["run"]: r["error"] for r in rows}
    assert errors["ia3_A_specific"] == "ia3_A_specific diverged"
    assert errors["ia3_A_agnostic"] == "MemoryError: out of memory"
    # the command of a run: base config, shared + command-line overrides, axis values, its own folder
    args = called(first)["lora-8_A_specific"]
    assert args[:4] == ["--task", "caption", "--config", str(BASE)]
    assert args[4:] == ["train.max_steps=3", "adaptor.kind=lora", "adaptor.rank=8", "adaptor.targets=A",
                        "adaptor.context_agnostic=false", f"output_dir={tmp_path / 'out' / 'lora-8_A_specific'}"]

    second = FakeTrainer(tmp_path, PPL, PARAMS)
    rows = run_sweep(sweep, ["train.max_steps=3"], command=second.command, echo=lambda s: None)
    calls = called(second)
    assert sorted(calls) == ["ia3_A_agnostic", "ia3_A_specific", "lora-8_A_agnostic"]
    assert calls["lora-8_A_agnostic"][-1] == "train.resume=true"  # crashed with a checkpoint: continue from it
    assert "train.resume=true" not in calls["ia3_A_specific"]  # failed before any checkpoint: from scratch
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)

    third = FakeTrainer(tmp_path, PPL, PARAMS)
    run_sweep(sweep, ["train.max_steps=3"], command=third.command, echo=lambda s: None)
    assert third.calls == []  # everything has results.json


def test_results_csv_and_markdown(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["ia3", "lora-8"], "targets": ["A"],
                                                      "agnostic": [True, False]}}))
    run_sweep(sweep, command=FakeTrainer(tmp_path, PPL, PARAMS, fail={"ia3_A_specific"}).command, echo=lambda s: None)
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["ia3_A_agnostic", "ia3_A_specific", "lora-8_A_agnostic", "lora-8_A_specific"]
    r = rows["lora-8_A_specific"]
    assert (r["adaptor"], r["rank"], r["targets"], r["agnostic"]) == ("lora", "8", "A", "False")
    assert (float(r["best_val_ppl"]), int(r["trainable_params"]), r["best_epoch"]) == (3.125, 197530, "1")
    assert r["status"] == "ok"
    assert float(r["wall_time_s"]) >= 0
    assert rows["ia3_A_agnostic"]["rank"] == ""  # a rank only means something for LoRA
    bad = rows["ia3_A_specific"]
    assert (bad["status"], bad["best_val_ppl"], bad["error"]) == ("failed", "", "ia3_A_specific diverged")

    md = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | adaptor | rank | targets | context | trainable params | best val ppl |")
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in md[2:]}
    assert cells["lora-8_A_specific"][:7] == ["lora", "8", "A", "specific", "197,530", "3.125", "1"]
    assert cells["ia3_A_agnostic"][:6] == ["ia3", "", "A", "agnostic", "1,234", "4.250"]
    assert cells["ia3_A_specific"][-1] == "failed: ia3_A_specific diverged"


def test_a_plot_that_cannot_be_drawn_leaves_the_tables(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["ia3"], "targets": ["A"], "agnostic": [True]},
                                             "plot": ["rank", "bars"]}))
    lines: list[str] = []
    run_sweep(sweep, command=FakeTrainer(tmp_path, PPL, PARAMS).command, echo=lines.append)
    assert any(ln.startswith("no plot: a rank plot needs LoRA runs") for ln in lines)
    assert (tmp_path / "out" / "results.csv").is_file() and not (tmp_path / "out" / "ppl_rank.png").exists()
    assert (tmp_path / "out" / "ppl_bars.png").is_file()


def test_dry_run_trains_nothing_and_writes_nothing(tmp_path, monkeypatch):
    sweep = load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["ia3", "bitfit"]}}))
    lines, trainer = [], FakeTrainer(tmp_path, PPL, PARAMS)
    monkeypatch.chdir(tmp_path)  # the commands are shown as typed from here
    rows = run_sweep(sweep, command=trainer.command[:2], dry_run=True, echo=lines.append)
    assert trainer.calls == [] and not (tmp_path / "out").exists()
    assert [r["status"] for r in rows] == ["pending", "pending"]
    assert sum("would train: python launch/train_task.py --task caption" in ln for ln in lines) == 2


def test_a_run_trained_with_another_config_stops_the_sweep(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["ia3"]}}))
    (plan,) = plan_runs(sweep)
    plan.output_dir.mkdir(parents=True)
    from mtcpeft.config import save_config

    plan.config.train.lr = 0.123
    plan.config.train.resume = True  # ignored: a resumed run differs only there
    save_config(plan.config, plan.output_dir / "config.yaml")
    with pytest.raises(SweepError, match=r"run ia3: .* another config \(train.lr differ\); delete that folder"):
        plan_runs(sweep)


def _pixels(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as im:
        data = im.convert("RGB").tobytes()
    return {tuple(data[i:i + 3]) for i in range(0, len(data), 3)}


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_bar_and_rank_plots(tmp_path):
    rows = [{"run": f"{a}_{t}_{g}", "adaptor": a.split("-")[0], "rank": int(a.split("-")[1]) if "-" in a else None,
             "targets": t, "agnostic": g == "agnostic", "best_val_ppl": 3 + i / 10, "status": "ok"}
            for i, (a, t, g) in enumerate((a, t, g) for a in ("ia3", "lora-1", "lora-8") for t in ("A", "AF")
                                           for g in ("agnostic", "specific"))]
    rows[3]["best_val_ppl"] = None  # a failed run leaves a gap
    bars, rank = make_plots(rows, tmp_path, ["bars", "rank"])
    assert (bars.name, rank.name) == ("ppl_bars.png", "ppl_rank.png")
    for path in (bars, rank):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
    assert {_hex(COLOURS[True]), _hex(COLOURS[False])} <= _pixels(bars)  # agnostic and specific bars drawn
    only_specific = make_plots([r for r in rows if not r["agnostic"]], tmp_path / "s", ["bars"])[0]
    assert _hex(COLOURS[False]) in _pixels(only_specific) and _hex(COLOURS[True]) not in _pixels(only_specific)
    assert make_plots([{**r, "best_val_ppl": None} for r in rows], tmp_path / "none") == []  # nothing to plot yet
    with pytest.raises(ValueError, match="needs LoRA runs"):
        make_plots([r for r in rows if r["adaptor"] == "ia3"], tmp_path / "r", ["rank"])


# ------------------------------------------------------------------------------------------------- real
@pytest.mark.slow
def test_real_two_run_sweep(tiny_lm_dir, tmp_path):
    """Two real trainings of a tiny model through launch/sweep.py (each run a train_task.py process of its own),
    then a rerun that skips both: the axes reach training (manifest), the tables carry each run's results.json, a
    resumed sweep starts no finished run again."""
    shared = [o for o in tiny_overrides(tiny_lm_dir, "unused") if not o.startswith("output_dir=")]
    path = sweep_file(tmp_path, {"overrides": shared + ["train.epochs=1", "train.mixed_precision=no"],
                                 "runs": [{"adaptor": "lora-2", "targets": "AF", "agnostic": False},
                                          {"adaptor": "bitfit", "targets": "F", "agnostic": True}]})
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_cli", ROOT / "launch" / "sweep.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rows = cli.main(["--config", str(path)])
    out = tmp_path / "out"
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    with open(out / "results.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    for name, contexts, kind in (("lora-2_AF_specific", ["image", "text"], "lora"),
                                 ("bitfit_F_agnostic", ["shared"], "bitfit")):
        res = json.loads((out / name / "results.json").read_text())
        assert float(table[name]["best_val_ppl"]) == pytest.approx(res["best_val_ppl"])
        assert int(table[name]["trainable_params"]) == res["trainable_parameters"]
        manifest = json.loads((out / name / "plugin" / "plugin.json").read_text())
        assert manifest["contexts"] == contexts and manifest["adaptor"]["kind"] == kind
    assert json.loads((out / "lora-2_AF_specific" / "plugin" / "plugin.json").read_text())["adaptor"]["rank"] == 2
    status = json.loads((out / "bitfit_F_agnostic" / "sweep_run.json").read_text())
    assert status["status"] == "ok" and status["args"][-1] == f"output_dir={out / 'bitfit_F_agnostic'}"
    assert Image.open(out / "ppl_bars.png").format == "PNG"
    def stamps() -> dict:  # what a started run rewrites: its log and its progress file
        return {(n, f): (out / n / f).stat().st_mtime_ns for n in table for f in ("sweep.log", "progress.json")}

    before = stamps()
    again = cli.main(["--config", str(path), "--plot", "rank"])  # nothing left to train: seconds
    assert again == rows and (out / "ppl_rank.png").is_file()
    assert stamps() == before  # neither finished run was started again


def test_interrupted_run_is_resumed_whatever_it_left(tmp_path):
    """A run killed before its first complete checkpoint (only a plugin, or a checkpoint mid-swap) is resumed, not
    retrained into a folder the trainer would refuse as a previous run."""
    from mtcpeft.config import save_config

    sweep = load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["lora-8", "bitfit"]}}))
    first = plan_runs(sweep)
    assert [p.action for p in first] == ["train", "train"]
    for plan, leftover in zip(first, ("plugin", "checkpoint.tmp")):
        save_config(plan.config, plan.output_dir / "config.yaml")
        (plan.output_dir / leftover).mkdir()
    assert [p.action for p in plan_runs(sweep)] == ["resume", "resume"]
