"""Sweep plots as in Context-PEFT (arXiv 2312.08900): validation perplexity per adaptor x placement x
context-agnostic/specific as grouped bars (Figure 3), and over LoRA rank as lines (Figure 4).

Both read the rows of :func:`mtcpeft.experiments.sweep_results.collect_rows` (keys adaptor, rank, targets,
agnostic, best_val_ppl, status); runs without a perplexity (failed, not run yet) leave a gap. matplotlib with the
Agg backend: no display.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

DPI = 120
COLOURS = {True: "#9ecae1", False: "#2171b5"}  # context-agnostic light, context-specific dark
LABELS = {True: "context-agnostic", False: "context-specific"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def adaptor_label(row: dict) -> str:
    """``lora-8`` for LoRA (its rank matters), the kind otherwise."""
    return f"lora-{row['rank']}" if row["adaptor"] == "lora" and row.get("rank") else str(row["adaptor"])


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _ppl(row: dict) -> float | None:
    v = row.get("best_val_ppl")
    return float(v) if v not in (None, "") else None


def ppl_bars(rows: Sequence[dict], path: str | os.PathLike, title: str = "validation perplexity") -> Path:
    """One panel per placement (A, F, AF); in each, one pair of bars per adaptor: agnostic beside specific."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    placements = _ordered(r["targets"] for r in rows)
    adaptors = _ordered(adaptor_label(r) for r in rows)
    flavours = [f for f in (True, False) if any(bool(r["agnostic"]) == f for r in rows)]
    values = {(r["targets"], adaptor_label(r), bool(r["agnostic"])): _ppl(r) for r in rows}
    known = [v for v in values.values() if v is not None]
    fig, axes = plt.subplots(1, len(placements), figsize=(1.2 + 0.9 * len(adaptors) * len(placements), 4.2),
                             sharey=True, squeeze=False, dpi=DPI)
    width = 0.8 / len(flavours)
    for ax, placement in zip(axes[0], placements):
        for k, flavour in enumerate(flavours):
            xs = [i + (k - (len(flavours) - 1) / 2) * width for i in range(len(adaptors))]
            ys = [values.get((placement, a, flavour)) for a in adaptors]
            for x, y in zip(xs, ys):
                if y is None:  # no result (failed, not run yet): no bar, a mark instead
                    ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90,
                            transform=ax.get_xaxis_transform())
                    continue
                ax.bar(x, y, width, color=COLOURS[flavour], edgecolor="black", linewidth=0.5)
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(adaptors)), adaptors, rotation=30, ha="right")
        ax.set_title(f"placement {placement}")
        ax.grid(axis="y", alpha=0.3)
    if known:  # perplexities of similar runs differ by little: start the axis near the smallest
        lo, hi = min(known), max(known)
        pad = max(hi - lo, 0.05 * hi)
        axes[0][0].set_ylim(max(0.0, lo - 0.5 * pad), hi + 0.35 * pad)
    axes[0][0].set_ylabel("best validation perplexity")
    fig.suptitle(title)
    handles = [Patch(facecolor=COLOURS[f], edgecolor="black", linewidth=0.5, label=LABELS[f]) for f in flavours]
    fig.legend(handles=handles, loc="upper left", fontsize=8, ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title and legend line
    return _save(fig, plt, path)


def ppl_by_rank(rows: Sequence[dict], path: str | os.PathLike,
                title: str = "validation perplexity over LoRA rank") -> Path:
    """One line per (placement, agnostic/specific) over the LoRA rank (log2 axis)."""
    plt = _pyplot()
    lora = [r for r in rows if r["adaptor"] == "lora" and r.get("rank")]
    if not lora:
        raise ValueError("a rank plot needs LoRA runs with a rank; this sweep has none (use plot: bars)")
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=DPI)
    series = _ordered((r["targets"], bool(r["agnostic"])) for r in lora)
    for targets, flavour in series:
        mine = [r for r in lora if (r["targets"], bool(r["agnostic"])) == (targets, flavour)]
        pts = sorted((int(r["rank"]), _ppl(r)) for r in mine if _ppl(r) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{targets}, {LABELS[flavour]}")
    ranks = sorted({int(r["rank"]) for r in lora})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("best validation perplexity")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    from mtcpeft.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


PLOT_FILES = {"bars": ("ppl_bars.png", ppl_bars), "rank": ("ppl_rank.png", ppl_by_rank)}


def make_plots(rows: Sequence[dict], out: str | os.PathLike, kinds: Sequence[str] = ("bars",)) -> list[Path]:
    """Write the requested plots (``bars``, ``rank``) into ``out``; none when no run has a result yet."""
    if not any(_ppl(r) is not None for r in rows):
        return []
    return [PLOT_FILES[k][1](rows, Path(out) / PLOT_FILES[k][0]) for k in kinds]
