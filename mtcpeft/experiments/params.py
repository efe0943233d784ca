"""Count the parameters a context adaptor adds to an LM (shapes only: works on the meta device).

The count reads each :class:`~mtcpeft.core.adaptors.ContextLayer`'s declared ``adaptor_param_names``, so a new
adaptor kind is counted with no change here. Per context and targeted projection (d_in -> d_out): LoRA adds
r * (d_in + d_out), BitFit d_out, IA3 the width it scales; everything is multiplied by the number of contexts.

:func:`param_table` puts the paper's comparison in one table (Context-PEFT, arXiv 2312.08900): IA3, BitFit and
LoRA ranks 1/8/64, context-agnostic and context-specific, against full fine-tuning (every LM parameter that is
trainable as the LM is built: all but the frozen input embeddings of the paper's LLM).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from mtcpeft.core.adaptors import AdaptorConfig, ContextLayer, adaptor_config
from mtcpeft.core.contexts import ContextVocab
from mtcpeft.core.model import ContextModel

AGNOSTIC = "all"  # the one context of context-agnostic PEFT
PAPER_LLM = "paper-llm"  # the paper's own LLM, built from its configuration (it has no public weights)


@dataclass(frozen=True)
class ParamCount:
    trainable: int  # adaptor parameters injected into the LM (all contexts)
    total_lm: int  # parameters of the frozen LM, tied weights once, adaptors excluded

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total_lm if self.total_lm else 0.0


def count_adaptor_params(model: nn.Module) -> int:
    """Adaptor parameters in ``model`` (a :class:`ContextModel` or an LM holding context layers)."""
    return sum(
        getattr(layer, name).numel()
        for layer in model.modules()
        if isinstance(layer, ContextLayer)
        for name in layer.adaptor_param_names
    )


def count_lm_params(model: nn.Module) -> int:
    """Parameters of the LM itself: every distinct parameter minus the adaptors' (tied weights count once)."""
    return sum(p.numel() for p in model.parameters()) - count_adaptor_params(model)


def count_params(model: nn.Module) -> ParamCount:
    return ParamCount(count_adaptor_params(model), count_lm_params(model))


def build_lm(name: str | os.PathLike, *, random_init: bool = True) -> nn.Module:
    """:func:`mtcpeft.models.load_lm` (on the meta device with ``random_init``), plus ``"paper-llm"``: the
    paper's LLM has no weights anywhere, so it is always built from its configuration on the meta device."""
    if os.fspath(name).lower() == PAPER_LLM:
        from mtcpeft.models.paper_llm import build_paper_llm

        return build_paper_llm(device="meta")
    from mtcpeft.models.lm import load_lm

    return load_lm(name, device=torch.device("meta")) if random_init else load_lm(name)


def count_for(
    lm: nn.Module | str | os.PathLike,
    adaptor: AdaptorConfig | str = "lora",
    contexts: ContextVocab | str | Iterable[str] = AGNOSTIC,
    targets: str | Sequence[str] = "AF",
    *,
    random_init: bool = True,
    **adaptor_kwargs,
) -> ParamCount:
    """Inject ``adaptor`` for ``contexts`` into ``lm`` and count.

    ``lm`` is a model (consumed: adaptors are injected into it) or anything :func:`mtcpeft.models.load_lm`
    accepts; with ``random_init`` (the default) it is built on the meta device from its configuration, which is
    instant and gives the same count as the real weights.
    """
    if not isinstance(lm, nn.Module):
        lm = build_lm(lm, random_init=random_init)
    if not isinstance(adaptor, str) and adaptor_kwargs:
        raise TypeError(f"options {sorted(adaptor_kwargs)} go with an adaptor kind name, not a built config")
    config = adaptor_config(adaptor, **adaptor_kwargs) if isinstance(adaptor, str) else adaptor
    return count_params(ContextModel(lm, contexts, config, targets))


# ------------------------------------------------------------------------------------------ comparison table
# (row label, adaptor kind, options): the adaptors the paper compares, each in one row
TABLE_METHODS: tuple[tuple[str, str, dict], ...] = (
    ("IA3", "ia3", {}),
    ("BitFit", "bitfit", {}),
    ("LoRA-1", "lora", {"rank": 1}),
    ("LoRA-8", "lora", {"rank": 8}),
    ("LoRA-64", "lora", {"rank": 64}),
)
FULL_FT = "Full fine-tuning"


@dataclass(frozen=True)
class TableRow:
    method: str
    agnostic: ParamCount  # one shared group of adaptor parameters
    specific: ParamCount  # one group per context


def count_full(lm: nn.Module) -> ParamCount:
    """Full fine-tuning (``train.mode=full``, no adaptor): every LM parameter that requires grad as built (frozen
    input embeddings excluded)."""
    return ParamCount(sum(p.numel() for p in lm.parameters() if p.requires_grad), count_lm_params(lm))


def param_table(
    build: Callable[[], nn.Module], contexts: Sequence[str] = ("image", "text"), targets: str | Sequence[str] = "AF"
) -> list[TableRow]:
    """One row per adaptor of :data:`TABLE_METHODS`, then full fine-tuning (same in both columns).

    ``build()`` returns a fresh LM for every count (injection consumes it): build it on the meta device.
    """
    if len(contexts) < 2:
        raise ValueError(f"context-specific counts need at least two contexts, got {list(contexts)}")
    rows = [
        TableRow(
            label,
            count_for(build(), kind, [AGNOSTIC], targets, **opts),
            count_for(build(), kind, list(contexts), targets, **opts),
        )
        for label, kind, opts in TABLE_METHODS
    ]
    full = count_full(build())
    return rows + [TableRow(FULL_FT, full, full)]


def markdown_table(rows: Sequence[TableRow], contexts: Sequence[str]) -> str:
    """The rows as a GitHub markdown table; the header names the LM's parameter total the percents refer to."""
    total = rows[0].agnostic.total_lm
    specific = f"context-specific ({len(contexts)} contexts: {', '.join(contexts)})"
    lines = [
        f"| method | context-agnostic | % of LM ({total:,}) | {specific} | % of LM ({total:,}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.agnostic.trainable:,} | {r.agnostic.percent:.4f}% "
            f"| {r.specific.trainable:,} | {r.specific.percent:.4f}% |"
        )
    return "\n".join(lines)
