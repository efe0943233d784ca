"""Mixed-kind adaptors: every context group keeps its own kind (caption LoRA + QA IA3 + a BitFit plugin in one
model), and each adapted projection applies to each token the group of its context, whatever kind that group is.

Config: ``kinds`` names the kind of each context group, in the model's context order; ``kind_options`` holds each
kind's options (``{"lora": {"rank": 4, ...}, "ia3": {}}``). Each kind acts where its own placement puts it (LoRA
and BitFit on projection outputs, IA3 on keys, values and the FFN intermediate), so a projection gets one context
layer per kind that acts on it, named ``<module>.<kind>``, holding that kind's groups only (stacked over its own
groups: the leading dim of its tensors is the number of groups of that kind). A kind placed unlike the model's
targets (caption LoRA on "A", QA IA3 on "AF") keeps its own placement (``placements``).

Layer (:class:`MixedLayer`): the kinds' own layers are chained on ONE call of the frozen projection — each kind's
layer takes the next inner one as its base (the innermost takes the projection). A token of another kind is
context -1 for a layer (its kind-local plan, :func:`~mtcpeft.core.contexts.restrict_plan`), and a layer leaves
-1 tokens exactly as its base computes them (an added 0, a scale of 1, no update), so every token meets exactly
its own group's kind and nothing else. Each kind's plan is derived once per forward from the shared plan (cached
on the plan object), with no sort and no host sync.

Merging groups of different kinds into one group is refused (their tensors are different functions). A mixed
plugin merges again with others: the merger takes it apart by kind (:meth:`MixedConfig.split`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from mtcpeft.core.contexts import NO_CONTEXT, Router, RoutingPlan, restrict_plan
from .base import ADAPTORS, AdaptorConfig, OptionError, register_adaptor

# shared plan -> {kind: that kind's plan}: derived once per forward per kind, dropped with the plan
_KIND_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class MixedConfig(AdaptorConfig):
    """Adaptor groups of several kinds in one model."""

    kinds: list[str] = field(default_factory=list)  # the kind of each context group, in context order
    kind_options: dict[str, dict] = field(default_factory=dict)  # each kind's options: {"lora": {"rank": 8}}
    # where a kind is placed unlike the model's targets: {"lora": "A"} (a preset or comma-separated patterns)
    placements: dict[str, str] = field(default_factory=dict)

    strategies = {"keep": "keeps each group as it is"}
    composite = True

    def __post_init__(self):
        if not self.kinds:
            raise OptionError("mixed", "kinds", "must name the kind of each context group", self.kinds)
        known = [k for k in ADAPTORS if ADAPTORS.get(k).param_names() and k != self.name]
        bad = [k for k in self.kinds if k not in known]
        if bad:
            raise OptionError("mixed", "kinds", f"must name adaptor kinds with groups ({', '.join(known)})", bad[0])
        if set(self.kind_options) != set(self.kinds):
            raise OptionError("mixed", "kind_options", f"must hold the options of exactly the kinds {self.kind_order}",
                              sorted(self.kind_options))
        if not set(self.placements) <= set(self.kinds):
            raise OptionError("mixed", "placements", f"must name kinds of the groups {self.kind_order}",
                              sorted(self.placements))
        self._configs = {}
        for k in self.kind_order:
            try:
                self._configs[k] = ADAPTORS.get(k)(**self.kind_options[k])
            except TypeError as e:
                raise OptionError("mixed", f"kind_options.{k}", f"must be options of {k} ({e})",
                                  self.kind_options[k]) from None

    @property
    def kind_order(self) -> list[str]:
        """The kinds present, in order of their first group."""
        return list(dict.fromkeys(self.kinds))

    @classmethod
    def of(cls, kinds: Sequence[str], configs: dict[str, AdaptorConfig],
           placements: dict[str, str] | None = None) -> "MixedConfig":
        """The mixed config of groups of ``kinds`` (one per context), each kind with its config in ``configs`` and,
        where it is placed unlike the model's targets, its placement in ``placements``."""
        return cls(kinds=list(kinds), kind_options={k: configs[k].options() for k in dict.fromkeys(kinds)},
                   placements=dict(placements or {}))

    def kind_config(self, kind: str) -> AdaptorConfig:
        return self._configs[kind]

    # ------------------------------------------------------------------------------------------- injection
    def members(self) -> list[AdaptorConfig]:
        return [self._configs[k] for k in self.kind_order]

    def member_targets(self, member: AdaptorConfig, targets):
        return self.placements.get(member.name, targets)

    def wrap(self, base, router: Router, name: str, placed) -> tuple[nn.Module, list[str]]:
        if router.num_contexts != len(self.kinds):
            raise OptionError("mixed", "kinds", f"must name one kind per context ({router.num_contexts})", self.kinds)
        layer = MixedLayer(base, router, self, name, [(c.name, role, kw) for c, role, kw in placed])
        return layer, [self.target(name, k) for k in layer.order]

    def at(self, target: str) -> AdaptorConfig:
        kind = target.rpartition(".")[2]
        if kind not in self._configs:
            raise OptionError("mixed", "targets", f"must end in the kind of their layer ({self.kind_order})", target)
        return self._configs[kind]

    def groups_at(self, target: str, contexts: Sequence[str]) -> list[str]:
        kind = self.at(target).name
        return [c for c, k in zip(contexts, self.kinds) if k == kind]

    def target(self, module: str, kind: str) -> str:
        """The name of the context layer of ``kind`` at the projection ``module``."""
        return f"{module}.{kind}"

    def split(self, contexts, targets):
        return [(self._configs[kind], [c for c, k in zip(contexts, self.kinds) if k == kind],
                 [(t, t.rpartition(".")[0]) for t in targets if t.rpartition(".")[2] == kind])
                for kind in self.kind_order]

    def shape_problem(self, shapes):  # pragma: no cover - every check goes through at(target)
        raise NotImplementedError("a mixed config checks each target with the config of its kind (at(target))")


class _KindRouter:
    """The router a kind's layer reads: the shared plan restricted to that kind's groups (kind-local ids)."""

    def __init__(self, router: Router, kind: str, groups: list[int]):
        self.router, self.kind, self.num_contexts = router, kind, len(groups)
        self.groups = groups
        table = [NO_CONTEXT] * (router.num_contexts + 1)
        for local, g in enumerate(groups):
            table[g + 1] = local
        self.table = torch.tensor(table, dtype=torch.long)

    def plan_for(self, num_tokens: int, where: str) -> RoutingPlan:
        plan = self.router.plan_for(num_tokens, where)
        cache = _KIND_PLANS.get(plan)
        if cache is None:
            cache = _KIND_PLANS[plan] = {}
        local = cache.get(self.kind)
        if local is None:
            local = cache[self.kind] = restrict_plan(plan, self.groups, self.table)
        return local


class MixedLayer(nn.Module):
    """A frozen projection with one context layer per kind acting on it (submodules named by kind), chained on one
    call of the projection. ``forward(x)``: (..., d_in) -> (..., d_out)."""

    def __init__(self, base: nn.Module, router: Router, config: MixedConfig, name: str,
                 placed: Sequence[tuple[str, str, dict]]):
        super().__init__()
        self.base_layer = base
        self.order: list[str] = []
        inner = base
        for kind, role, kwargs in placed:
            groups = [i for i, k in enumerate(config.kinds) if k == kind]
            sub_config = config.kind_config(kind)
            layer = sub_config.layer_cls(base, _KindRouter(router, kind, groups), sub_config, role,
                                         f"{name}.{kind}", **kwargs)
            # the chain: this layer's base is the next inner one, held as a plain attribute (each module is
            # registered once, where it lives: the projection here, each kind's layer under its kind)
            del layer._modules["base_layer"]
            layer.__dict__["base_layer"] = inner
            self.add_module(kind, layer)
            self.order.append(kind)
            inner = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.order[-1])(x)

    def extra_repr(self) -> str:
        return f"kinds={self.order}"


def compose_kinds(kinds: Sequence[str], configs: dict[str, AdaptorConfig],
                  placements: dict[str, str] | None = None) -> AdaptorConfig:
    """The adaptor config of a model whose context groups have the given ``kinds`` (one per context, in context
    order), each kind with its config in ``configs`` (and its own placement in ``placements``, if any): that
    kind's own config when there is one kind, else mixed."""
    if len(set(kinds)) == 1:
        return configs[kinds[0]]
    return MixedConfig.of(kinds, configs, placements)


MixedConfig.layer_cls = None  # injected through wrap(), never as one layer class
register_adaptor("mixed")(MixedConfig)
