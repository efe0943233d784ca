"""Sweep plots as in Context-PEFT (arXiv 2312.08900): validation perplexity per adaptor x placement x
context-agnostic/specific as grouped bars (Figure 3), and over LoRA rank as lines (Figure 4).

Both read the rows of :func:`mtcpeft.experiments.sweep_results.collect_rows` (keys adaptor, rank, targets,
agnostic, best_val_ppl, status); runs without a perplexity (failed, not run yet) leave a gap. Runs of the same bar or
line point over several seeds are drawn as their mean with the 95% t-interval of the mean (:mod:`.stats`): error
bars on the bars, a band around each rank line; one seed draws a plain value, as a one-seed sweep always did.
What each plot draws: :func:`bar_values`, :func:`rank_series`. matplotlib with the Agg backend: no display.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .stats import Summary, summarize

DPI = 120
COLOURS = {True: "#9ecae1", False: "#2171b5"}  # context-agnostic light, context-specific dark
INTERVAL_COLOUR = "#d95f02"  # error bars of the 95% intervals over seeds
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


def bar_values(rows: Sequence[dict]) -> dict[tuple[str, str, bool], Summary]:
    """What the bar chart draws: per (placement, adaptor label, agnostic) the perplexities of its runs (its seeds)
    with a result, summarised: a bar at ``mean`` (none when ``n`` is 0), an error bar of ``+- half`` (none below 2)."""
    groups: dict[tuple[str, str, bool], list[float]] = {}
    for r in rows:
        ppl = groups.setdefault((r["targets"], adaptor_label(r), bool(r["agnostic"])), [])
        if _ppl(r) is not None:
            ppl.append(_ppl(r))
    return {key: summarize(ppl) for key, ppl in groups.items()}


def rank_series(rows: Sequence[dict]) -> dict[tuple[str, bool], list[tuple[int, Summary]]]:
    """What the rank plot draws: per (placement, agnostic) line, (LoRA rank, perplexities over seeds summarised) by
    rank, ranks without any result left out; a band of ``+- half`` where there is one."""
    lora = [r for r in rows if r["adaptor"] == "lora" and r.get("rank")]
    out: dict[tuple[str, bool], list[tuple[int, Summary]]] = {}
    for series in _ordered((r["targets"], bool(r["agnostic"])) for r in lora):
        mine = [r for r in lora if (r["targets"], bool(r["agnostic"])) == series]
        by_rank = {rank: summarize([_ppl(r) for r in mine if int(r["rank"]) == rank and _ppl(r) is not None])
                   for rank in sorted({int(r["rank"]) for r in mine})}
        out[series] = [(rank, s) for rank, s in by_rank.items() if s.n]
    return out


def _extent(summaries) -> list[float]:
    return [v for s in summaries if s.n for v in (s.mean - (s.half or 0.0), s.mean + (s.half or 0.0))]


def ppl_bars(rows: Sequence[dict], path: str | os.PathLike, title: str = "validation perplexity") -> Path:
    """One panel per placement (A, F, AF); in each, one pair of bars per adaptor: agnostic beside specific (the
    mean over seeds, with its 95% interval as an error bar)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    placements = _ordered(r["targets"] for r in rows)
    adaptors = _ordered(adaptor_label(r) for r in rows)
    flavours = [f for f in (True, False) if any(bool(r["agnostic"]) == f for r in rows)]
    values = bar_values(rows)
    known = _extent(values.values())
    fig, axes = plt.subplots(1, len(placements), figsize=(1.2 + 0.9 * len(adaptors) * len(placements), 4.2),
                             sharey=True, squeeze=False, dpi=DPI)
    width = 0.8 / len(flavours)
    for ax, placement in zip(axes[0], placements):
        for k, flavour in enumerate(flavours):
            xs = [i + (k - (len(flavours) - 1) / 2) * width for i in range(len(adaptors))]
            for x, a in zip(xs, adaptors):
                s = values.get((placement, a, flavour), Summary(0))
                if not s.n:  # no result (failed, not run yet): no bar, a mark instead
                    ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90,
                            transform=ax.get_xaxis_transform())
                    continue
                ax.bar(x, s.mean, width, color=COLOURS[flavour], edgecolor="black", linewidth=0.5)
                if s.half is not None:
                    ax.errorbar(x, s.mean, yerr=s.half, fmt="none", ecolor=INTERVAL_COLOUR, elinewidth=1.2,
                                capsize=2.5, capthick=1.2)
                ax.annotate(f"{s.mean:.2f}", (x, s.mean + (s.half or 0.0)), xytext=(0, 2 if s.half else 0),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(adaptors)), adaptors, rotation=30, ha="right")
        ax.set_title(f"placement {placement}")
        ax.grid(axis="y", alpha=0.3)
    if known:  # perplexities of similar runs differ by little: start the axis near the smallest
        lo, hi = min(known), max(known)
        pad = max(hi - lo, 0.05 * hi)
        axes[0][0].set_ylim(max(0.0, lo - 0.5 * pad), hi + 0.35 * pad)
    seeds = max((s.n for s in values.values()), default=0)
    axes[0][0].set_ylabel("best validation perplexity" +
                          (f"\n(mean of up to {seeds} seeds, 95% interval)" if seeds > 1 else ""))
    fig.suptitle(title)
    handles = [Patch(facecolor=COLOURS[f], edgecolor="black", linewidth=0.5, label=LABELS[f]) for f in flavours]
    fig.legend(handles=handles, loc="upper left", fontsize=8, ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title and legend line
    return _save(fig, plt, path)


def ppl_by_rank(rows: Sequence[dict], path: str | os.PathLike,
                title: str = "validation perplexity over LoRA rank") -> Path:
    """One line per (placement, agnostic/specific) over the LoRA rank (log2 axis): the mean over seeds, in a band
    of its 95% interval."""
    plt = _pyplot()
    lora = [r for r in rows if r["adaptor"] == "lora" and r.get("rank")]
    if not lora:
        raise ValueError("a rank plot needs LoRA runs with a rank; this sweep has none (use plot: bars)")
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=DPI)
    for (targets, flavour), pts in rank_series(rows).items():
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1].mean for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{targets}, {LABELS[flavour]}")
        if any(p[1].half is not None for p in pts):
            half = [p[1].half or 0.0 for p in pts]
            ax.fill_between(xs, [y - h for y, h in zip(ys, half)], [y + h for y, h in zip(ys, half)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ranks = sorted({int(r["rank"]) for r in lora})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("best validation perplexity")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    seeds = max((s.n for pts in rank_series(rows).values() for _, s in pts), default=0)
    ax.set_title(title + (f"\n(mean of up to {seeds} seeds, band: 95% interval)" if seeds > 1 else ""))
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
