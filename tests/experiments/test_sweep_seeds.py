"""Sweeps over seeds (``seeds: [0, 1, 2]``, ``--seeds``): one run per grid point and seed, resumable as the seed list
changes; per point mean +- std over seeds; per specific/agnostic pair the differences paired by seed with a 95%
t-interval (checked against hand computations); plots with the intervals; one-seed sweeps as before."""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
from PIL import Image

from mtcpeft.experiments.plots import COLOURS, INTERVAL_COLOUR, bar_values, make_plots, rank_series
from mtcpeft.experiments.sweep import plan_runs, run_sweep
from mtcpeft.experiments.sweep_results import COLUMNS, count_line, pair_rows, point_rows
from mtcpeft.experiments.sweep_spec import SweepError, load_sweep, parse_seeds
from support.cli import load_script
from support.sweeps import FakeTrainer, called, sweep_file

GRID = {"adaptor": ["ia3", "lora-8"], "targets": ["A"], "agnostic": [True, False]}
T2, T1 = 4.302652730, 12.706204736  # t(0.975) with 2 and 1 degrees of freedom
# ia3_A: specific - agnostic = -0.5, -0.4, -0.7 (specific better); lora-8_A: seed 2 of the specific run fails, so
# the pair keeps seeds 0 and 1: -0.2, +0.3 (interval contains 0)
PPL = {"ia3_A_specific_s0": 3.0, "ia3_A_specific_s1": 3.1, "ia3_A_specific_s2": 3.2,
       "ia3_A_agnostic_s0": 3.5, "ia3_A_agnostic_s1": 3.5, "ia3_A_agnostic_s2": 3.9,
       "lora-8_A_specific_s0": 2.0, "lora-8_A_specific_s1": 2.4,
       "lora-8_A_agnostic_s0": 2.2, "lora-8_A_agnostic_s1": 2.1, "lora-8_A_agnostic_s2": 2.3}


def quiet(_line: str) -> None:
    pass


def csv_rows(path: Path) -> dict[str, dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {r[next(iter(r))]: r for r in rows}


# -------------------------------------------------------------------------------------------------- planning
def test_each_point_runs_once_per_seed_with_the_seed_in_name_config_and_command(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"seeds": [3, 1], "grid": {"adaptor": ["ia3", "bitfit"]}}))
    plans = plan_runs(sweep, command=["train"])
    assert [(p.name, p.point, p.seed, p.config.seed) for p in plans] == [
        ("ia3_s3", "ia3", 3, 3), ("ia3_s1", "ia3", 1, 1), ("bitfit_s3", "bitfit", 3, 3), ("bitfit_s1", "bitfit", 1, 1)]
    assert plans[0].output_dir == tmp_path / "out" / "ia3_s3"
    assert plans[0].command[-2:] == ["seed=3", f"output_dir={tmp_path / 'out' / 'ia3_s3'}"]
    assert all(p.pair is None for p in plans)  # no agnostic axis: no pairs


def test_without_seeds_a_point_runs_once_with_the_base_seed_named_as_before(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"overrides": ["seed=7"], "grid": {"adaptor": ["ia3"]}}))
    (plan,) = plan_runs(sweep)
    assert sweep.seeds is None and (plan.name, plan.point, plan.seed, plan.config.seed) == ("ia3", "ia3", None, 7)
    assert not any(a.startswith("seed=") for a in plan.command if a != "seed=7")


def test_command_line_seeds_replace_the_files(tmp_path):
    path = sweep_file(tmp_path, {"seeds": [0, 1, 2], "grid": {"adaptor": ["ia3"]}})
    assert [p.name for p in plan_runs(load_sweep(path, seeds=parse_seeds("5,4")))] == ["ia3_s5", "ia3_s4"]
    cli = load_script("sweep.py")
    rows = cli.main(["--config", str(path), "--seeds", "9", "--dry-run"])
    assert [(r["run"], r["seed"], r["status"]) for r in rows] == [("ia3_s9", 9, "pending")]
    with pytest.raises(SweepError, match=r"--seeds 0,x: give comma-separated integers, e.g. --seeds 0,1,2"):
        cli.main(["--config", str(path), "--seeds", "0,x"])


@pytest.mark.parametrize("body, message", [
    ({"seeds": [0, 0, 1]}, r"seeds \[0, 0, 1\] repeat 0: each seed is one run per grid point"),
    ({"seeds": []}, "seeds must be a non-empty list of distinct integers"),
    ({"seeds": "0,1"}, r"seeds must be .* e.g. seeds: \[0, 1, 2\]; got '0,1'"),
    ({"seeds": [True]}, "seeds must be a non-empty list"),
    ({"seeds": [-1]}, r"integers in \[0, 2\*\*32\)"),
    ({"seeds": [1.5]}, "seeds must be a non-empty list"),
    ({"grid": {"seed": [0, 1]}}, r"seed is not a grid axis: list the seeds .* as seeds: \[0, 1, 2\]"),
    ({"seeds": [0, 1], "overrides": ["seed=3"]}, r"override 'seed=3': this sweep runs every point with seeds \[0, 1\]"),
])
def test_bad_seeds_fail_with_a_clear_error(tmp_path, body, message):
    with pytest.raises(SweepError, match=message):
        plan_runs(load_sweep(sweep_file(tmp_path, {"grid": {"adaptor": ["ia3"]}, **body})))


@pytest.mark.skipif(importlib.util.find_spec("scipy") is not None,
                    reason="scipy is installed: any number of seeds has a t quantile")
def test_more_seeds_than_the_t_table_needs_scipy(tmp_path):
    with pytest.raises(SweepError, match=r"seeds: the built-in t table covers 31 seeds at most \(40 given\); "
                                         "install scipy"):
        load_sweep(sweep_file(tmp_path, {"seeds": list(range(40)), "grid": {"adaptor": ["ia3"]}}))


# ---------------------------------------------------------------------------------------------------- resume
def test_runs_go_seed_by_seed_and_a_changed_seed_list_keeps_finished_runs(tmp_path):
    path = sweep_file(tmp_path, {"seeds": [0, 1], "grid": {"adaptor": ["ia3"], "targets": ["A"],
                                                           "agnostic": [True, False]}})
    first = FakeTrainer(tmp_path, PPL)
    lines: list[str] = []
    run_sweep(load_sweep(path), command=first.command, echo=lines.append)
    assert [list(called(first))] == [["ia3_A_agnostic_s0", "ia3_A_specific_s0", "ia3_A_agnostic_s1",
                                      "ia3_A_specific_s1"]]  # every point with seed 0 first
    assert lines[0] == f"sweep: 4 runs (2 grid points x 2 seeds) in {tmp_path / 'out'} (0 done, 4 to train)"
    assert lines[1].startswith("[1/4] ia3_A_agnostic_s0: training")

    second = FakeTrainer(tmp_path, PPL)  # a third seed: only its runs train
    run_sweep(load_sweep(path, seeds=[0, 1, 2]), command=second.command, echo=quiet)
    assert sorted(called(second)) == ["ia3_A_agnostic_s2", "ia3_A_specific_s2"]

    third = FakeTrainer(tmp_path, PPL)  # fewer seeds: nothing to train, the tables hold the listed seeds only
    rows = run_sweep(load_sweep(path, seeds=[2, 0]), command=third.command, echo=quiet)
    assert third.calls == [] and [r["run"] for r in rows] == ["ia3_A_agnostic_s2", "ia3_A_agnostic_s0",
                                                              "ia3_A_specific_s2", "ia3_A_specific_s0"]
    (pair,) = csv_rows(tmp_path / "out" / "pairs.csv").values()
    assert (pair["seeds"], pair["n"]) == ("2 0", "2")
    assert [float(x) for x in pair["diffs"].split()] == pytest.approx([3.2 - 3.9, 3.0 - 3.5])


# ---------------------------------------------------------------------------------------------------- tables
def test_point_and_pair_tables_against_hand_computation(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"seeds": [0, 1, 2], "grid": GRID}))
    lines: list[str] = []
    rows = run_sweep(sweep, command=FakeTrainer(tmp_path, PPL, fail={"lora-8_A_specific_s2"}).command,
                     echo=lines.append)
    out = tmp_path / "out"
    assert lines[-2] == ("specific better with an interval excluding zero in 1 of 2 pairs; agnostic better in 0; "
                         "the interval contains 0 in 1")

    runs = csv_rows(out / "results.csv")
    assert list(next(iter(runs.values()))) == ["run", "point", "seed", *COLUMNS[1:]]
    assert (runs["ia3_A_specific_s1"]["point"], runs["ia3_A_specific_s1"]["seed"]) == ("ia3_A_specific", "1")
    assert runs["lora-8_A_specific_s2"]["status"] == "failed"

    points = csv_rows(out / "points.csv")
    ia3 = points["ia3_A_specific"]  # 3.0, 3.1, 3.2: mean 3.1, std 0.1, half t2 * 0.1 / sqrt(3)
    assert (ia3["n"], ia3["runs"], ia3["seeds"]) == ("3", "3", "0 1 2")
    assert [float(ia3[k]) for k in ("mean_val_ppl", "std_val_ppl", "ci95_low", "ci95_high")] == pytest.approx(
        [3.1, 0.1, 3.1 - T2 * 0.1 / math.sqrt(3), 3.1 + T2 * 0.1 / math.sqrt(3)])
    lora = points["lora-8_A_specific"]  # 2.0, 2.4 (seed 2 failed): std 0.4 / sqrt(2), half t1 * 0.2
    assert (lora["n"], lora["runs"], lora["seeds"]) == ("2", "3", "0 1")
    assert [float(lora[k]) for k in ("mean_val_ppl", "std_val_ppl", "ci95_low", "ci95_high")] == pytest.approx(
        [2.2, 0.4 / math.sqrt(2), 2.2 - T1 * 0.2, 2.2 + T1 * 0.2])

    pairs = csv_rows(out / "pairs.csv")
    assert list(pairs) == ["ia3_A", "lora-8_A"]
    p = pairs["ia3_A"]  # -0.5, -0.4, -0.7: mean -8/15, std sqrt(7/300), half t2 * sqrt(7) / 30
    half = T2 * math.sqrt(7) / 30
    assert (p["adaptor"], p["rank"], p["targets"], p["n"], p["seeds"], p["dropped"]) == ("ia3", "", "A", "3",
                                                                                          "0 1 2", "")
    assert [float(p[k]) for k in ("mean_diff", "std_diff", "ci95_low", "ci95_high")] == pytest.approx(
        [-8 / 15, math.sqrt(7 / 300), -8 / 15 - half, -8 / 15 + half])
    assert (p["excludes_zero"], p["verdict"]) == ("True", "specific better")
    q = pairs["lora-8_A"]  # seeds 0, 1: -0.2, +0.3: mean 0.05, std 0.5 / sqrt(2), half t1 / 4
    assert (q["rank"], q["n"], q["seeds"], q["dropped"]) == ("8", "2", "0 1", "seed 2 (specific failed)")
    assert [float(q[k]) for k in ("mean_diff", "std_diff", "ci95_low", "ci95_high")] == pytest.approx(
        [0.05, 0.5 / math.sqrt(2), 0.05 - T1 / 4, 0.05 + T1 / 4])
    assert (q["excludes_zero"], q["verdict"]) == ("False", "interval contains 0")

    md = (out / "results.md").read_text()
    assert "over seeds 0, 1, 2" in md and ("specific better with an interval excluding zero in 1 of 2 pairs; "
                                           "agnostic better in 0; the interval contains 0 in 1.") in md
    table = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in md.splitlines()
             if ln.startswith("| ") and not ln.startswith("| point") and not ln.startswith("| pair")}
    assert table["ia3_A_specific"][5:8] == ["3.100 ± 0.100", "[2.852, 3.348]", "3 of 3"]
    assert table["lora-8_A_specific"][7] == "2 of 3"
    assert table["ia3_A"][3:] == ["-0.533 ± 0.153", "[-0.913, -0.154]", "3", "yes", "specific better"]
    assert table["lora-8_A"][-2:] == ["no", "interval contains 0; dropped seed 2 (specific failed)"]
    assert table["lora-8_A_specific_s2"][0] == "2" and table["lora-8_A_specific_s2"][-1].startswith("failed: ")
    assert [r["status"] for r in rows].count("ok") == 11


def row(point: str, seed: int | None, agnostic: bool, ppl: float | None, pair: str = "ia3_A") -> dict:
    return {"run": point if seed is None else f"{point}_s{seed}", "point": point, "seed": seed, "pair": pair,
            "adaptor": "ia3", "rank": None, "targets": "A", "agnostic": agnostic, "best_val_ppl": ppl,
            "status": "ok" if ppl is not None else "pending", "trainable_params": 10, "wall_time_s": 60.0}


def test_pairs_count_agnostic_wins_and_pairs_without_an_interval():
    rows = [row("a", s, True, 2.0 + s / 10) for s in (0, 1, 2)] + [row("s", s, False, 2.5 + s / 10 + (s == 1) / 100)
                                                                   for s in (0, 1, 2)]
    rows += [row("b", 0, True, 3.0, "b"), row("c", 0, False, 2.0, "b"), row("b2", 1, True, None, "b"),
             row("c2", 1, False, 1.0, "b")]  # pair b: two points on a side is not a pair
    rows += [row("d", 0, True, 3.0, "d"), row("e", 0, False, 2.0, "d"), row("d", 1, True, None, "d"),
             row("e", 1, False, 1.0, "d")]
    rows += [row("f", 0, True, None, "f"), row("g", 0, False, 1.0, "f")]
    rows += [row("h", 0, True, 1.0, "h")]  # no specific side: not a pair
    pairs = {p["pair"]: p for p in pair_rows(rows)}
    assert list(pairs) == ["ia3_A", "d", "f"]
    assert pairs["ia3_A"]["verdict"] == "agnostic better" and pairs["ia3_A"]["ci95_low"] > 0
    assert (pairs["d"]["n"], pairs["d"]["verdict"], pairs["d"]["dropped"]) == (
        1, "one paired seed: no interval", "seed 1 (agnostic pending)")
    assert (pairs["d"]["mean_diff"], pairs["d"]["ci95_low"], pairs["d"]["excludes_zero"]) == (-1.0, None, None)
    assert (pairs["f"]["n"], pairs["f"]["verdict"]) == (0, "no seed with both results yet")
    assert count_line(list(pairs.values())) == (
        "specific better with an interval excluding zero in 0 of 3 pairs; agnostic better in 1; the interval "
        "contains 0 in 0; 2 without an interval (fewer than 2 seeds with both results)")
    points = {p["point"]: p for p in point_rows(rows)}
    assert (points["d"]["n"], points["d"]["runs"], points["d"]["mean_val_ppl"], points["d"]["std_val_ppl"]) == (
        1, 2, 3.0, None)
    assert points["a"]["wall_time_s"] == 180.0 and points["f"]["mean_val_ppl"] is None


def test_one_seed_sweeps_render_as_before(tmp_path):
    """No seeds: the runs table alone, exactly the columns and lines of a sweep before seeds existed."""
    sweep = load_sweep(sweep_file(tmp_path, {"grid": GRID}))
    ppl = {"ia3_A_agnostic": 4.25, "ia3_A_specific": 4.0, "lora-8_A_agnostic": 3.5, "lora-8_A_specific": 3.125}
    run_sweep(sweep, command=FakeTrainer(tmp_path, ppl, {n: 1234 for n in ppl}).command, echo=quiet)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["ppl_bars.png", "results.csv", "results.md"]
    assert (out / "results.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    md = (out / "results.md").read_text().splitlines()
    assert md[:2] == ["| run | adaptor | rank | targets | context | trainable params | best val ppl | best epoch | "
                      "wall time | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    assert len(md) == 6 and md[5].startswith("| lora-8_A_specific | lora | 8 | A | specific | 1,234 | 3.125 | 1 | ")
    assert md[5].endswith(" | ok |")


def test_an_explicit_single_seed_has_means_but_no_intervals(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"seeds": [1], "grid": GRID}))
    lines: list[str] = []
    run_sweep(sweep, command=FakeTrainer(tmp_path, PPL).command, echo=lines.append)
    pairs = csv_rows(tmp_path / "out" / "pairs.csv")
    assert (pairs["ia3_A"]["n"], pairs["ia3_A"]["ci95_low"]) == ("1", "") and float(pairs["ia3_A"]["mean_diff"]) == (
        pytest.approx(3.1 - 3.5))
    assert pairs["ia3_A"]["verdict"] == "one paired seed: no interval"
    assert lines[-2].endswith("2 without an interval (fewer than 2 seeds with both results)")


# ----------------------------------------------------------------------------------------------------- plots
def _pixels(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as im:
        data = im.convert("RGB").tobytes()
    return {tuple(data[i:i + 3]) for i in range(0, len(data), 3)}


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_bars_draw_the_mean_and_95_percent_interval_over_seeds(tmp_path):
    rows = [row("ia3_A_agnostic", s, True, v) for s, v in enumerate((3.5, 3.5, 3.9))]
    rows += [row("ia3_A_specific", s, False, v) for s, v in enumerate((3.0, 3.1, None))]
    values = bar_values(rows)
    agn, spec = values[("A", "ia3", True)], values[("A", "ia3", False)]
    # agnostic 3.5, 3.5, 3.9: mean 10.9 / 3, deviations -0.4/3, -0.4/3, 0.8/3; specific 3.0, 3.1 (seed 2 failed)
    assert (agn.n, agn.mean, agn.half) == (3, pytest.approx(10.9 / 3), pytest.approx(
        T2 * math.sqrt((2 * (0.4 / 3) ** 2 + (0.8 / 3) ** 2) / 2) / math.sqrt(3)))
    assert (spec.n, spec.mean, spec.half) == (2, pytest.approx(3.05), pytest.approx(T1 * 0.05))
    (bars,) = make_plots(rows, tmp_path, ["bars"])
    assert _hex(INTERVAL_COLOUR) in _pixels(bars) and _hex(COLOURS[False]) in _pixels(bars)
    (plain,) = make_plots([r for r in rows if r["seed"] == 0], tmp_path / "one", ["bars"])  # one seed: no bars
    assert bar_values([r for r in rows if r["seed"] == 0])[("A", "ia3", True)].half is None
    assert _hex(INTERVAL_COLOUR) not in _pixels(plain)


def test_rank_lines_draw_means_and_intervals_over_seeds(tmp_path):
    rows = [{**row(f"lora-{r}_AF_specific", s, False, 2.0 / r + s / 10), "adaptor": "lora", "rank": r,
             "targets": "AF"} for r in (1, 4, 16) for s in (0, 1, 2)]
    rows[-1]["best_val_ppl"] = None  # rank 16, seed 2 failed
    rows += [{**row("lora-2_AF_specific", 0, False, None), "adaptor": "lora", "rank": 2, "targets": "AF"}]
    (series,) = rank_series(rows).values()
    assert [(r, s.n) for r, s in series] == [(1, 3), (4, 3), (16, 2)]  # rank 2 has no result: no point
    assert [s.mean for _, s in series] == pytest.approx([2.1, 0.6, 0.125 + 0.05])
    assert [s.half for _, s in series] == pytest.approx([T2 * 0.1 / math.sqrt(3)] * 2 + [T1 * 0.05])
    (path,) = make_plots(rows, tmp_path, ["rank"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 600


# ------------------------------------------------------------------------------------------------------ real
@pytest.mark.slow
def test_real_seeded_sweep_of_a_tiny_model(tiny_lm_dir, tmp_path):
    """A specific/agnostic pair over seeds 0 and 1, four real trainings through launch/sweep.py: each run trains with
    its seed (config.yaml; different seeds, different results) and the tables are the runs' results.json reduced."""
    import json

    from conftest import tiny_overrides

    shared = [o for o in tiny_overrides(tiny_lm_dir, "unused") if o.partition("=")[0] not in ("output_dir", "seed")]
    path = sweep_file(tmp_path, {"overrides": shared + ["train.epochs=1", "train.mixed_precision=no"],
                                 "seeds": [0, 1], "grid": {"adaptor": ["lora-2"], "targets": ["AF"],
                                                           "agnostic": [True, False]}})
    rows = load_script("sweep.py").main(["--config", str(path)])
    out = tmp_path / "out"
    assert [(r["run"], r["status"]) for r in rows] == [
        ("lora-2_AF_agnostic_s0", "ok"), ("lora-2_AF_agnostic_s1", "ok"),
        ("lora-2_AF_specific_s0", "ok"), ("lora-2_AF_specific_s1", "ok")], rows
    ppl = {r["run"]: json.loads((out / r["run"] / "results.json").read_text())["best_val_ppl"] for r in rows}
    for r in rows:
        saved = (out / r["run"] / "config.yaml").read_text()
        assert f"\nseed: {r['seed']}\n" in saved
    assert ppl["lora-2_AF_specific_s0"] != ppl["lora-2_AF_specific_s1"]  # the seed reached training
    points = csv_rows(out / "points.csv")
    assert float(points["lora-2_AF_specific"]["mean_val_ppl"]) == pytest.approx(
        (ppl["lora-2_AF_specific_s0"] + ppl["lora-2_AF_specific_s1"]) / 2)
    (pair,) = csv_rows(out / "pairs.csv").values()
    assert [float(x) for x in pair["diffs"].split()] == pytest.approx(
        [ppl[f"lora-2_AF_specific_s{s}"] - ppl[f"lora-2_AF_agnostic_s{s}"] for s in (0, 1)], rel=1e-5)
    assert (out / "ppl_bars.png").is_file()
    assert "specific better with an interval excluding zero in " in (out / "results.md").read_text()
