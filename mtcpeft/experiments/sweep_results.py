"""What a sweep records of each run (``sweep_run.json``) and its tables: ``results.csv`` (raw values, one row per
run) and ``results.md`` (readable). The rows also feed the plots (:mod:`.plots`).

A seeded sweep (``seeds: [0, 1, 2]``) adds, over the runs that have a result (failed or pending runs are left out
and ``n`` says how many remain): ``points.csv``, per grid point the mean and sample standard deviation of the
validation perplexity over seeds and the 95% t-interval of the mean; ``pairs.csv``, per specific/agnostic pair (two
points that differ only in ``agnostic``) the difference specific - agnostic seed by seed, its mean, standard
deviation and 95% t-interval (n - 1 dof, :mod:`.stats`), and whether that interval excludes zero. A seed with a
result on one side only is dropped from its pair, and the table says so. ``results.md`` then holds both tables, a
count line ("specific better with an interval excluding zero in X of Y pairs") and the runs. A sweep without
``seeds`` writes the runs table alone, as it always did.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mtcpeft.io import atomic_path, read_json
from .runner import RunPlan, read_results
from .stats import summarize
from .sweep_spec import FULL

STATUS_FILE = "sweep_run.json"  # per run: status, wall time, error, arguments (written by the sweep)
COLUMNS = ("run", "adaptor", "rank", "targets", "agnostic", "trainable_params", "best_val_ppl", "best_epoch",
           "wall_time_s", "status", "error")
SEEDED_COLUMNS = ("run", "point", "seed", *COLUMNS[1:])
POINT_COLUMNS = ("point", "adaptor", "rank", "targets", "agnostic", "trainable_params", "n", "runs", "seeds",
                 "mean_val_ppl", "std_val_ppl", "ci95_low", "ci95_high", "wall_time_s")
PAIR_COLUMNS = ("pair", "adaptor", "rank", "targets", "n", "seeds", "diffs", "dropped", "mean_diff", "std_diff",
                "ci95_low", "ci95_high", "excludes_zero", "verdict")


@dataclass
class SweepPlan(RunPlan):
    """A run of a sweep: its plan and its place in the sweep."""

    point: str = ""  # the grid point: the run's name without its seed
    seed: int | None = None  # None: the sweep has no seeds (the base config's seed, once)
    pair: str | None = None  # the specific/agnostic pair of the point (None: no agnostic axis)


def read_status(output_dir: Path) -> dict:
    """What the sweep recorded of a run's last attempt ({} before any)."""
    return read_json(Path(output_dir) / STATUS_FILE)


def run_row(plan: SweepPlan) -> dict:
    """One table row: the run's adaptor settings (from its config), its results and its sweep status."""
    spec = plan.config.adaptor
    res, st = read_results(plan.output_dir), read_status(plan.output_dir)
    ok = res.get("best_val_ppl") is not None
    status = "ok" if ok else st.get("status") if st.get("status") == "failed" else "pending"
    adaptor = FULL if plan.config.train.mode == "full" else spec.kind
    return {"run": plan.name, "point": plan.point or plan.name, "seed": plan.seed, "pair": plan.pair,
            "adaptor": adaptor, "rank": spec.rank if spec.kind == "lora" else None,
            "targets": spec.targets, "agnostic": spec.context_agnostic,
            "trainable_params": res.get("trainable_parameters"), "best_val_ppl": res.get("best_val_ppl"),
            "best_epoch": res.get("best_epoch"), "wall_time_s": st.get("wall_time_s"), "status": status,
            "error": "" if ok else st.get("error", "")}


def collect_rows(plans: Sequence[SweepPlan]) -> list[dict]:
    return [run_row(p) for p in plans]


def _groups(rows: Sequence[dict], key: str) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get(key) or r["run"], []).append(r)
    return out


def _ok(r: dict) -> bool:
    return r.get("best_val_ppl") is not None


def point_rows(rows: Sequence[dict]) -> list[dict]:
    """Per grid point (first-seen order): perplexity over the seeds with a result (:data:`POINT_COLUMNS`)."""
    out = []
    for point, mine in _groups(rows, "point").items():
        done = [r for r in mine if _ok(r)]
        s = summarize([r["best_val_ppl"] for r in done])
        walls = [r["wall_time_s"] for r in mine if r.get("wall_time_s") is not None]
        params = next((r["trainable_params"] for r in done if r.get("trainable_params") is not None), None)
        out.append({"point": point, **{k: mine[0][k] for k in ("adaptor", "rank", "targets", "agnostic")},
                    "trainable_params": params, "n": s.n, "runs": len(mine),
                    "seeds": " ".join(str(r["seed"]) for r in done), "mean_val_ppl": s.mean, "std_val_ppl": s.std,
                    "ci95_low": s.low, "ci95_high": s.high, "wall_time_s": sum(walls) if walls else None})
    return out


def _missing(r: dict | None) -> str:
    return "not planned" if r is None else r["status"] if r.get("status") in ("failed", "pending") else "no result"


def _verdict(n: int, excludes: bool | None, high: float | None) -> str:
    if n == 0:
        return "no seed with both results yet"
    if excludes is None:
        return "one paired seed: no interval"
    if not excludes:
        return "interval contains 0"
    return "specific better" if high < 0 else "agnostic better"


def pair_rows(rows: Sequence[dict]) -> list[dict]:
    """Per specific/agnostic pair (first-seen order; only pairs with one point on each side): the differences
    specific - agnostic of the seeds with a result on both sides (:data:`PAIR_COLUMNS`)."""
    out = []
    for pair, mine in _groups([r for r in rows if r.get("pair") is not None], "pair").items():
        sides = {flag: [r for r in mine if bool(r["agnostic"]) == flag] for flag in (False, True)}
        if any(len({r["point"] for r in side}) != 1 for side in sides.values()):
            continue  # no counterpart (or an ambiguous one): not a pair
        spec, agn = ({r["seed"]: r for r in sides[flag]} for flag in (False, True))
        seeds = list(dict.fromkeys([*spec, *agn]))
        paired = [s for s in seeds if s in spec and s in agn and _ok(spec[s]) and _ok(agn[s])]
        dropped = []
        for s in (s for s in seeds if s not in paired):
            gone = [f"{side} {_missing(rs.get(s))}" for side, rs in (("specific", spec), ("agnostic", agn))
                    if s not in rs or not _ok(rs[s])]
            dropped.append(f"seed {s} ({', '.join(gone)})")
        diffs = [spec[s]["best_val_ppl"] - agn[s]["best_val_ppl"] for s in paired]
        d = summarize(diffs)
        first = sides[False][0]
        out.append({"pair": pair, **{k: first[k] for k in ("adaptor", "rank", "targets")}, "n": d.n,
                    "seeds": " ".join(map(str, paired)), "diffs": " ".join(f"{x:.6g}" for x in diffs),
                    "dropped": "; ".join(dropped), "mean_diff": d.mean, "std_diff": d.std, "ci95_low": d.low,
                    "ci95_high": d.high, "excludes_zero": d.excludes_zero(),
                    "verdict": _verdict(d.n, d.excludes_zero(), d.high)})
    return out


def count_line(pairs: Sequence[dict]) -> str:
    """How many pairs favour each side with an interval excluding zero."""
    better = sum(p["verdict"] == "specific better" for p in pairs)
    worse = sum(p["verdict"] == "agnostic better" for p in pairs)
    short = sum(p["excludes_zero"] is None for p in pairs)
    return (f"specific better with an interval excluding zero in {better} of {len(pairs)} pairs; agnostic better in "
            f"{worse}; the interval contains 0 in {len(pairs) - better - worse - short}"
            + (f"; {short} without an interval (fewer than 2 seeds with both results)" if short else ""))


# ------------------------------------------------------------------------------------------------- writing
def _num(value: Any, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key == "best_val_ppl":
        return f"{value:.3f}"
    if key == "trainable_params":
        return f"{value:,}"
    if key == "agnostic":
        return "agnostic" if value else "specific"
    if key == "wall_time_s":
        return f"{int(value) // 60}m {int(value) % 60:02d}s"
    return str(value)


def _interval(row: dict, sign: bool = False) -> str:
    if row["ci95_low"] is None:
        return ""
    return f"[{_num(row['ci95_low'], sign=sign)}, {_num(row['ci95_high'], sign=sign)}]"


def _md(titles: Sequence[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)] +
            ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in lines])


def _csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r.get(k) for k in columns} for r in rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _run_lines(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    titles = {"run": "run", "point": "point", "seed": "seed", "adaptor": "adaptor", "rank": "rank",
              "targets": "targets", "agnostic": "context", "trainable_params": "trainable params",
              "best_val_ppl": "best val ppl", "best_epoch": "best epoch", "wall_time_s": "wall time"}
    shown = [c for c in columns[:-2] if c != "point"]
    cells = [[_cell(k, r.get(k)) for k in shown] + [r["status"] + (f": {r['error']}" if r.get("error") else "")]
             for r in rows]
    return _md([titles[c] for c in shown] + ["status"], cells)


def _point_lines(points: Sequence[dict]) -> list[str]:
    cells = [[p["point"], *(_cell(k, p[k]) for k in ("adaptor", "rank", "targets", "agnostic", "trainable_params")),
              _num(p["mean_val_ppl"]) + (f" ± {_num(p['std_val_ppl'])}" if p["std_val_ppl"] is not None else ""),
              _interval(p), f"{p['n']} of {p['runs']}", _cell("wall_time_s", p["wall_time_s"])] for p in points]
    return _md(("point", "adaptor", "rank", "targets", "context", "trainable params", "val ppl mean ± std",
                "95% interval", "n", "wall time"), cells)


def _pair_lines(pairs: Sequence[dict]) -> list[str]:
    cells = [[p["pair"], _cell("adaptor", p["adaptor"]), _cell("rank", p["rank"]), _cell("targets", p["targets"]),
              _num(p["mean_diff"], sign=True) + (f" ± {_num(p['std_diff'])}" if p["std_diff"] is not None else ""),
              _interval(p, sign=True), str(p["n"]),
              {True: "yes", False: "no", None: ""}[p["excludes_zero"]],
              p["verdict"] + (f"; dropped {p['dropped']}" if p["dropped"] else "")] for p in pairs]
    return _md(("pair", "adaptor", "rank", "targets", "specific - agnostic (mean ± std)", "95% interval", "n",
                "excludes 0", "verdict"), cells)


def write_tables(rows: Sequence[dict], out: str | os.PathLike) -> None:
    """``results.csv`` (raw values, one row per run) and ``results.md`` (readable tables), atomically; a seeded
    sweep (rows with a seed) also ``points.csv`` and ``pairs.csv``."""
    out = Path(out)
    if not any(r.get("seed") is not None for r in rows):
        _csv(rows, COLUMNS, out / "results.csv")
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text("\n".join(_run_lines(rows, COLUMNS)) + "\n", encoding="utf-8")
        return
    points, pairs = point_rows(rows), pair_rows(rows)
    _csv(rows, SEEDED_COLUMNS, out / "results.csv")
    _csv(points, POINT_COLUMNS, out / "points.csv")
    _csv(pairs, PAIR_COLUMNS, out / "pairs.csv")
    seeds = ", ".join(map(str, dict.fromkeys(r["seed"] for r in rows)))
    md = [f"Best validation perplexity over seeds {seeds}: mean ± sample standard deviation over the n runs with "
          "a result; 95% interval: Student-t interval of the mean (n - 1 degrees of freedom).", "",
          "## Grid points", "", *_point_lines(points), ""]
    if pairs:
        md += ["## Context-specific - context-agnostic, paired by seed", "",
               "Per seed the specific run's perplexity minus the agnostic run's (negative: specific is better); a "
               "seed with a result on one side only is dropped from its pair.", "",
               count_line(pairs) + ".", "", *_pair_lines(pairs), ""]
    md += ["## Runs", "", *_run_lines(rows, SEEDED_COLUMNS)]
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
