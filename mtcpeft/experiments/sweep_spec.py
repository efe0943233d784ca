"""The sweep file: which runs an ablation sweep trains (Context-PEFT, arXiv 2312.08900, Table 1 / Figure 3, or
over LoRA ranks, Figure 4).

A sweep file (YAML) names a base run config, overrides shared by every run, and either a ``grid`` of axes (every
combination is a run) or an explicit ``runs`` list::

    base: ../caption_offline.yaml        # a run config; a relative path is read from the sweep file's folder
    task: caption                        # default: the base config's task
    out: runs/sweeps/table1              # default: runs/sweeps/<sweep file name>
    overrides: [data.train_limit=200, train.epochs=1]
    grid: {adaptor: [ia3, bitfit, lora-8], targets: [A, F, AF], agnostic: [true, false]}
    plot: bars                           # bars (Figure 3) | rank (Figure 4) | a list of both
    seeds: [0, 1, 2]                     # each grid point once per seed; default: the base config's seed, once

Axes (and the keys of a ``runs`` entry): ``adaptor`` (a kind, ``lora-R`` = LoRA of rank R, ``none`` = the
frozen LM, ``full`` = full fine-tuning: ``train.mode=full``), ``rank``, ``targets``
(A | F | AF | module patterns), ``agnostic`` (true | false), or any dotted config key (``train.lr``). A run is
named after its values (``lora-8_AF_specific``), a run of a seeded sweep also after its seed
(``lora-8_AF_specific_s1``: config key ``seed=1``); a grid point is a run's values without the seed. How the runs
are trained: :mod:`.sweep`; what the tables report over seeds: :mod:`.sweep_results`.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Sequence

import yaml

from mtcpeft.config import ConfigError, load_config
from .stats import t_critical

AXES = ("adaptor", "rank", "targets", "agnostic")
FULL = "full"  # adaptor axis value of full fine-tuning (train.mode=full, no adaptor); "none" is the frozen LM
SWEEP_KEYS = ("base", "task", "out", "overrides", "grid", "runs", "plot", "seeds")
PLOTS = ("bars", "rank")


class SweepError(ConfigError):
    """A sweep file or its runs cannot be planned; the message names the key or run and the fix (a ConfigError:
    the launch scripts print it as one ``error:`` line)."""


@dataclass
class Sweep:
    """A parsed sweep file: the base config, shared overrides and one mapping of axis values per run."""

    base: Path
    task: str
    out: Path
    overrides: list[str]
    runs: list[dict[str, Any]]  # per grid point: axis -> value, in axis order (optionally "name")
    plots: list[str] = field(default_factory=lambda: ["bars"])
    seeds: list[int] | None = None  # each point once per seed; None: once, with the base config's seed


def _suggest(name: str, choices: Sequence[str]) -> str:
    guess = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {guess[0]!r}? " if guess else ""


def axis_overrides(axis: str, value: Any) -> list[str]:
    """Config overrides of one axis value: ``("adaptor", "lora-8")`` -> adaptor.kind=lora, adaptor.rank=8."""
    if axis == "adaptor":
        kind, dash, rank = str(value).partition("-")
        if kind == FULL and not dash:  # Table 1's full fine-tuning row: a training mode, not an adaptor kind
            return ["adaptor.kind=none", "train.mode=full"]
        if not dash:
            return [f"adaptor.kind={kind}"]
        if kind != "lora" or not rank.isdigit() or int(rank) < 1:
            raise SweepError(f"adaptor value {value!r}: only LoRA takes a rank, written lora-R with R >= 1 (lora-8)")
        return ["adaptor.kind=lora", f"adaptor.rank={int(rank)}"]
    if axis == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"rank value {value!r} must be an integer >= 1")
        return [f"adaptor.rank={value}"]
    if axis == "targets":
        return [f"adaptor.targets={value}"]
    if axis == "agnostic":
        if not isinstance(value, bool):
            raise SweepError(f"agnostic value {value!r} must be true or false")
        return [f"adaptor.context_agnostic={str(value).lower()}"]
    if axis == "seed":
        raise SweepError("seed is not a grid axis: list the seeds every grid point runs with as seeds: [0, 1, 2] "
                         "(a key of the sweep file beside grid) or --seeds 0,1,2")
    if "." in axis:  # any config key; load_config checks it when the runs are planned
        return [f"{axis}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    raise SweepError(f"unknown sweep axis {axis!r}; {_suggest(axis, AXES)}axes are {', '.join(AXES)} "
                     "or a dotted config key such as train.lr")


def _name_part(axis: str, value: Any) -> str:
    if axis == "agnostic":
        return "agnostic" if value else "specific"
    if axis == "rank":
        return f"r{value}"
    text = str(value) if "." not in axis else f"{axis.rsplit('.', 1)[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "+", text).strip("+")


def run_name(values: dict[str, Any]) -> str:
    """Directory name of a run: its axis values joined by "_" (``lora-8_AF_specific``); ``name`` wins."""
    if values.get("name"):
        return str(values["name"])
    return "_".join(_name_part(a, v) for a, v in values.items()) or "run"


def seeded_name(point: str, seed: int | None) -> str:
    """Directory name of a point's run with ``seed`` (``lora-8_AF_specific_s1``); the point's name without one."""
    return point if seed is None else f"{point}_s{seed}"


def pair_name(values: dict[str, Any]) -> str | None:
    """The specific/agnostic pair a point belongs to: its name without the ``agnostic`` axis (None without it)."""
    if "agnostic" not in values:
        return None
    return run_name({a: v for a, v in values.items() if a not in ("agnostic", "name")})


def check_seeds(seeds: Any, where: str = "seeds") -> list[int]:
    """The seeds of a sweep, checked: a non-empty list of distinct integers in [0, 2**32) (what NumPy accepts),
    few enough for a 95% t-interval (:func:`.stats.t_critical`)."""
    if (not isinstance(seeds, list) or not seeds or
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 32 for s in seeds)):
        raise SweepError(f"{where} must be a non-empty list of distinct integers in [0, 2**32), e.g. "
                         f"seeds: [0, 1, 2]; got {seeds!r}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise SweepError(f"{where} {seeds} repeat {', '.join(map(str, dup))}: each seed is one run per grid point; "
                         "list every seed once")
    if len(seeds) > 1:
        try:
            t_critical(len(seeds) - 1)  # fail now, not when the tables are written after hours of training
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
    return list(seeds)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2] (checked)."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise SweepError(f"--seeds {text}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    return check_seeds(seeds, where="--seeds")


def expand(grid: dict[str, list] | None = None, runs: list[dict] | None = None) -> list[dict[str, Any]]:
    """The runs of a ``grid`` (every combination, first axis outermost) or of an explicit ``runs`` list."""
    if (grid is None) == (runs is None):
        raise SweepError("a sweep needs exactly one of grid: {axis: [values]} and runs: [{axis: value}, ...]")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise SweepError(f"grid must map axes to lists of values, got {grid!r}")
        for axis, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid axis {axis!r} needs a non-empty list of values, got {values!r}")
        out = [dict(zip(grid, combo)) for combo in product(*grid.values())]
    else:
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise SweepError(f"runs must be a non-empty list of mappings {{axis: value}}, got {runs!r}")
        out = [dict(r) for r in runs]
    for values in out:  # reject bad axes and values now, not after hours of training
        for axis, value in values.items():
            if axis != "name":
                axis_overrides(axis, value)
    names = [run_name(v) for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SweepError(f"runs {dup} would share a directory; make their values differ or give each a name")
    return out


def load_sweep(path: str | os.PathLike, out: str | os.PathLike | None = None, plot: str | None = None,
               seeds: list[int] | None = None) -> Sweep:
    """Parse and check a sweep file; ``out`` / ``plot`` / ``seeds`` replace the file's values (command-line
    options)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist; see configs/sweeps/ for examples")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise SweepError(f"{path} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in data:
        if key not in SWEEP_KEYS:
            raise SweepError(f"{path}: unknown key {key!r}; {_suggest(str(key), SWEEP_KEYS)}"
                             f"keys are {', '.join(SWEEP_KEYS)}")
    if not data.get("base"):
        raise SweepError(f"{path}: base (the run config every run starts from) is required, "
                         "e.g. base: ../caption_offline.yaml")
    base = Path(data["base"])
    base = base if base.is_absolute() else (path.parent / base).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base config {base} does not exist (a relative base is read from the sweep's folder)")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: overrides must be a list of KEY=VALUE strings, got {overrides!r}")
    plots = plot or data.get("plot") or "bars"
    plots = [plots] if isinstance(plots, str) else list(plots)
    for p in plots:
        if p not in PLOTS:
            raise SweepError(f"plot {p!r} is not one of {', '.join(PLOTS)}")
    if seeds is not None:
        seeds = check_seeds(seeds, where="--seeds")
    elif data.get("seeds") is not None:
        seeds = check_seeds(data["seeds"], where=f"{path}: seeds")
    task = data.get("task") or load_config(base).task
    out_dir = Path(out or data.get("out") or Path("runs") / "sweeps" / path.stem)
    return Sweep(base, task, out_dir, overrides, expand(data.get("grid"), data.get("runs")), plots, seeds)
