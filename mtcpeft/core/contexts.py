"""Context vocabularies and the per-forward routing plan shared by every adapted layer.

Every token carries a context id in ``[0, C)``; ``-1`` means "no adaptor" (base layer only, e.g. padding).
The routing plan is computed ONCE per forward from ``context_ids`` (B, S) and read by all adapted layers:

* uniform: every live token has the same context -> no permutation at all (``uniform`` is that id);
* grouped: a stable sort of the live tokens by context (``perm``), per-context ``counts`` (python ints),
  so a layer runs one dense matmul per context segment: the cost per token does not grow with C.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from mtcpeft.errors import MtcpeftError

NO_CONTEXT = -1


class ContextIdsError(MtcpeftError, ValueError):
    """``context_ids`` does not fit the model or the input (shape, dtype or range)."""


@dataclass(frozen=True)
class ContextVocab:
    """Ordered context names <-> ids. Names of merged tasks are namespaced as ``task.context``."""

    names: tuple[str, ...]

    def __post_init__(self):
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise ValueError("a context vocabulary needs at least one context name")
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"context names must be non-empty strings, got {bad!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"context names must be unique, repeated: {dup}")

    @classmethod
    def of(cls, names: str | Iterable[str]) -> "ContextVocab":
        """Build from ``"image,text"`` or an iterable of names."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        return cls(tuple(names))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def id(self, name: str | int) -> int:
        """The id of a context name (an int is checked and returned as is; -1 is "no adaptor")."""
        if isinstance(name, int):
            if not NO_CONTEXT <= name < len(self):
                raise ContextIdsError(f"context id {name} is outside [-1, {len(self)}) for contexts {list(self.names)}")
            return name
        try:
            return self.names.index(name)
        except ValueError:
            raise ContextIdsError(f"unknown context {name!r}; this model's contexts are {list(self.names)}") from None

    def ids(self, names: Sequence[str | int]) -> list[int]:
        return [self.id(n) for n in names]

    def namespaced(self, task: str) -> "ContextVocab":
        """``image`` -> ``caption.image``: how contexts of different tasks coexist in one merged model."""
        return ContextVocab(tuple(f"{task}.{n}" for n in self.names))

    def remap_table(self, target: "ContextVocab", mapping: dict[str, str] | None = None) -> torch.Tensor:
        """A (C_self + 1,) lookup: ``table[id + 1]`` is the id in ``target`` (index 0 keeps -1 as -1).

        ``mapping`` renames contexts of ``self`` to names of ``target``; unmapped names must exist in target.
        """
        mapping = mapping or {}
        table = [NO_CONTEXT] + [target.id(mapping.get(n, n)) for n in self.names]
        return torch.tensor(table, dtype=torch.long)


@dataclass(frozen=True)
class RoutingPlan:
    """How the tokens of one forward are grouped by context (computed once, read by every layer).

    Shapes: N = B * S tokens; L = number of live tokens (context id >= 0).
    """

    num_tokens: int  # N
    num_contexts: int  # C
    counts: tuple[int, ...]  # (C,) live tokens per context
    uniform: int | None  # the single context of all live tokens, else None
    live_mask: torch.Tensor | None  # (N,) bool, only when some tokens are -1
    perm: torch.Tensor | None  # (L,) token indices sorted by context; None on the uniform path
    ids: torch.Tensor  # (N,) long context ids, -1 kept

    @property
    def num_live(self) -> int:
        return sum(self.counts)

    @property
    def lookup_index(self) -> torch.Tensor:
        """(N,) ids shifted by one, so that row 0 of a ``[identity; table]`` lookup serves -1 tokens."""
        return self.ids + 1


def check_context_ids(context_ids: torch.Tensor, num_contexts: int, shape: Sequence[int] | None = None) -> None:
    """Raise :class:`ContextIdsError` naming the problem and the fix; returns nothing when they are good."""
    if not isinstance(context_ids, torch.Tensor):
        raise ContextIdsError(f"context_ids must be a torch.Tensor of integer ids, got {type(context_ids).__name__}")
    if context_ids.dtype.is_floating_point or context_ids.dtype.is_complex or context_ids.dtype == torch.bool:
        raise ContextIdsError(
            f"context_ids must hold integer ids (torch.long), got dtype {context_ids.dtype}; "
            "build them with torch.long, e.g. torch.full_like(input_ids, vocab.id('text'))"
        )
    if shape is not None and tuple(context_ids.shape) != tuple(shape):
        raise ContextIdsError(
            f"context_ids has shape {tuple(context_ids.shape)} but the input tokens have shape {tuple(shape)}; "
            "give one context id per token, (batch, seq_len)"
        )
    if context_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(context_ids.detach()))
    if lo < NO_CONTEXT or hi >= num_contexts:
        raise ContextIdsError(
            f"context_ids holds values in [{lo}, {hi}] but this model has {num_contexts} contexts: "
            f"valid ids are 0..{num_contexts - 1}, and -1 for tokens that take no adaptor (padding)"
        )


def build_plan(context_ids: torch.Tensor, num_contexts: int) -> RoutingPlan:
    """Group tokens by context. One host sync (the per-context counts) per forward, not per layer."""
    check_context_ids(context_ids, num_contexts)
    ids = context_ids.reshape(-1).long()
    n = ids.numel()
    counts_all = torch.bincount(ids + 1, minlength=num_contexts + 1).tolist()  # [#(-1), #0, ..., #C-1]
    n_dead, counts = counts_all[0], tuple(counts_all[1:])
    live_mask = ids >= 0 if n_dead else None
    used = [c for c, k in enumerate(counts) if k]
    if len(used) <= 1:  # fast path: no permutation at all
        return RoutingPlan(n, num_contexts, counts, used[0] if used else None, live_mask, None, ids)
    perm = torch.argsort(ids, stable=True)[n_dead:]  # -1 tokens sort first; drop them
    return RoutingPlan(n, num_contexts, counts, None, live_mask, perm, ids)


def restrict_plan(plan: RoutingPlan, groups: Sequence[int], table: torch.Tensor) -> RoutingPlan:
    """The plan of the same tokens over the contexts ``groups`` only (increasing ids of ``plan``), renumbered
    0..len(groups)-1; tokens of every other context become -1. ``table`` (C + 1,) long maps ``id + 1`` to the new id.

    No sort and no host sync: counts are the plan's own, and the permutation is the concatenation of the plan's
    (already context-sorted) segments of ``groups``, which come in the same order. Used by layers that serve a
    subset of a model's contexts (one kind's groups in a mixed-kind model)."""
    counts = tuple(plan.counts[g] for g in groups)
    ids = table.to(plan.ids.device)[plan.ids + 1]
    live_mask = None if sum(counts) == plan.num_tokens else ids >= 0
    used = [j for j, k in enumerate(counts) if k]
    if len(used) <= 1:
        return RoutingPlan(plan.num_tokens, len(groups), counts, used[0] if used else None, live_mask, None, ids)
    starts = [0]
    for k in plan.counts:
        starts.append(starts[-1] + k)
    perm = torch.cat([plan.perm[starts[g]:starts[g + 1]] for g in groups if plan.counts[g]])
    return RoutingPlan(plan.num_tokens, len(groups), counts, None, live_mask, perm, ids)


class Router:
    """Holds the routing plan of the forward in progress for every adapted layer of one model (a plain object,
    not a module).

    A plan belongs to its forward: :meth:`active` installs it for the duration of one call and restores what was
    there before, so no plan outlives its forward. Recomputation under activation checkpointing runs after the
    forward has ended; :meth:`checkpoint_context` captures the plan of the forward being checkpointed and
    re-installs exactly that plan while the segment is recomputed, whatever ran in between. A layer called with no
    plan installed raises, and each layer checks that the plan covers as many tokens as it sees.
    """

    def __init__(self, num_contexts: int):
        self.num_contexts = num_contexts
        self.plan: RoutingPlan | None = None

    def build(self, context_ids: torch.Tensor) -> RoutingPlan:
        return build_plan(context_ids, self.num_contexts)

    @contextmanager
    def active(self, plan: RoutingPlan | None) -> Iterator[RoutingPlan | None]:
        """Install ``plan`` for the block (one forward, or one recomputation), then restore the previous one."""
        previous, self.plan = self.plan, plan
        try:
            yield plan
        finally:
            self.plan = previous

    def route(self, context_ids: torch.Tensor) -> RoutingPlan:
        """Set a plan with no end (layer-level tests and benchmarks only; models use :meth:`active`)."""
        self.plan = self.build(context_ids)
        return self.plan

    def clear(self) -> None:
        self.plan = None

    def checkpoint_context(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): called when a segment runs forward, it
        returns (nothing for the forward, re-install this forward's plan for the recomputation)."""
        return nullcontext(), self.active(self.plan)

    def plan_for(self, num_tokens: int, where: str) -> RoutingPlan:
        plan = self.plan
        if plan is None:
            raise ContextIdsError(
                f"{where} has no routing plan: call the model through mtcpeft.ContextModel with context_ids "
                "(or inside `with model.routing(context_ids):`); for activation checkpointing use "
                "ContextModel.gradient_checkpointing_enable(), which carries each forward's plan to its recomputation"
            )
        if plan.num_tokens != num_tokens:
            raise ContextIdsError(
                f"{where} sees {num_tokens} tokens but the routing plan was built for {plan.num_tokens}: "
                "context_ids must cover exactly the tokens of this forward (stale routing from another call?)"
            )
        return plan
