"""What every adaptor kind shares: the config base, the wrapped-projection layer, per-token vector lookup.

An adaptor kind is one file holding a config dataclass and a layer class, registered with
:func:`register_adaptor`. A layer wraps one frozen projection (``nn.Linear`` or GPT-2's ``Conv1D``), keeps
its trainable tensors stacked over contexts (leading dim C) and declares their names in
``adaptor_param_names``: freezing, saving and counting are generic code that reads that tuple.

The config class answers everything else generic code (plugins, the merger, training) asks of a kind, so that
code never names one: its options (the dataclass fields), the shapes of its tensors in a plugin
(:meth:`AdaptorConfig.shape_problem`), the group that changes nothing (:meth:`~AdaptorConfig.identity_group`),
how a group stored under one config reads under another (:meth:`~AdaptorConfig.conform`: rank padding, scale
folding), the config of a merge (:meth:`~AdaptorConfig.merged`) and how groups combine under each merge strategy
(:meth:`~AdaptorConfig.combine`). The defaults fit kinds whose groups are vectors that act elementwise (BitFit,
IA3); LoRA overrides them. A *group* is one context's tensors of one layer, in ``adaptor_param_names`` order,
without the context dim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtcpeft.core.contexts import Router, RoutingPlan
from mtcpeft.errors import MtcpeftError
from mtcpeft.registry import Registry
from .merging import GroupMergeError, ties_merge

Group = list[torch.Tensor]  # one context's tensors of one layer, in adaptor_param_names order, no context dim

ADAPTORS: Registry[type["AdaptorConfig"]] = Registry("adaptor")


class OptionError(MtcpeftError, ValueError):
    """A bad value of an adaptor option; ``option`` names it (the run config reports it as ``adaptor.<option>``)."""

    def __init__(self, kind: str, option: str, requirement: str, value):
        super().__init__(f"{kind} {option} {requirement}, got {value!r}")
        self.option, self.requirement, self.value = option, requirement, value


def register_adaptor(name: str):
    """Class decorator for an :class:`AdaptorConfig` subclass; the config names its layer class."""

    def add(cls):
        cls.name = name
        return ADAPTORS.register(name)(cls)

    return add


@dataclass
class AdaptorConfig:
    """Base of adaptor configs. ``layer_cls`` is None for the "none" adaptor (nothing is injected)."""

    name: ClassVar[str] = "?"
    layer_cls: ClassVar[type["ContextLayer"] | None] = None
    # which placement table of a preset this kind reads: "proj" (whole projections: LoRA, BitFit) or
    # "activations" (keys/values at their projections' output, the FFN intermediate at the down projection's input:
    # IA3); with module-name patterns, "activations" kinds also read a ":in" / ":out" suffix
    placement: ClassVar[str] = "proj"
    # a composite kind holds groups of other kinds (mixed); single kinds are False
    composite: ClassVar[bool] = False

    # the value every tensor of a group holds when the group changes nothing (an added bias 0, a scale 1)
    identity: ClassVar[float] = 0.0
    # merge strategies this kind defines for several groups -> what the strategy does (plugins.merge.STRATEGIES)
    strategies: ClassVar[dict[str, str]] = {
        "keep": "keeps each group as it is",
        "average": "averages the groups' tensors elementwise",
        "ties": "TIES-merges the groups' differences from the identity elementwise",
    }

    def to_dict(self) -> dict:
        return {"kind": self.name, **self.options()}

    def options(self) -> dict:
        """The kind's options as plain values (``{"rank": 8, "alpha": 8.0, "dropout": 0.0}`` for LoRA)."""
        return asdict(self)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option schema: the dataclass fields of the kind's config."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Names of the per-context tensors of the kind's layer (none for a kind that injects nothing)."""
        return cls.layer_cls.adaptor_param_names if cls.layer_cls is not None else ()

    # ---------------------------------------------------------------------------------------- injection
    def members(self) -> list["AdaptorConfig"]:
        """The single-kind configs whose placements this config injects: itself (a mixed config: one per kind)."""
        return [self]

    def member_targets(self, member: "AdaptorConfig", targets):
        """Where ``member`` (one of :meth:`members`) is placed, given the model's ``targets``: there."""
        return targets

    def wrap(self, base: nn.Module, router: Router, name: str,
             placed: Sequence[tuple["AdaptorConfig", str, dict]]) -> tuple[nn.Module, list[str]]:
        """(the module replacing the projection ``name``, the names of the context layers in it, relative to the
        model). ``placed``: (member config, role, layer keyword arguments) of each member acting on ``name``."""
        (config, role, kwargs), = placed
        return config.layer_cls(base, router, config, role, name, **kwargs), [name]

    def at(self, target: str) -> "AdaptorConfig":
        """The single-kind config of the context layer ``target`` (a name :meth:`wrap` returned): this one."""
        return self

    def groups_at(self, target: str, contexts: Sequence[str]) -> list[str]:
        """The contexts whose groups the layer ``target`` stacks, in stacking order: all of them."""
        return list(contexts)

    def split(self, contexts: Sequence[str], targets: Sequence[str]
              ) -> list[tuple["AdaptorConfig", list[str], list[tuple[str, str]]]]:
        """The single-kind parts of a plugin of this config: [(kind config, its contexts, [(target, module it
        adapts)])]. One kind: this config, every context, each target adapting itself."""
        return [(self, list(contexts), [(t, t) for t in targets])]

    # ------------------------------------------------------------------------------ tensors in a plugin
    def shape_problem(self, shapes: dict[str, list[int]]) -> tuple[str, str] | None:
        """(param, what is wrong with its shape) when the shapes of one target's tensors (``{param: [contexts,
        ...]}``, leading dims already checked) cannot be this config's; None when they fit. Default: every tensor is
        (contexts, width)."""
        for param, shape in shapes.items():
            if len(shape) != 2:
                return param, f"has shape {shape}; a {self.name} {param} is 2-D (contexts, width)"
        return None

    def fit_problem(self, source: "AdaptorConfig") -> str | None:
        """Why groups saved under ``source`` (same kind) cannot be stored in layers built with this config, or
        None when :meth:`conform` maps them exactly."""
        return None

    def conform(self, group: Group, source: "AdaptorConfig") -> Group:
        """A group saved under ``source`` as layers built with this config hold it, computing the same function.
        Default: the same tensors."""
        return list(group)

    def identity_group(self, shapes: Sequence[torch.Size], seed: str) -> Group:
        """A group that changes nothing, of per-tensor ``shapes`` (no context dim); ``seed`` names the layer and
        group, for kinds that initialise something at random (the same name gives the same tensors)."""
        return [torch.full(tuple(s), self.identity) for s in shapes]

    # ---------------------------------------------------------------------------------------- merging
    @classmethod
    def merged(cls, sources: Sequence["AdaptorConfig"], new_groups: Sequence[Sequence["AdaptorConfig"]],
               strategy: str) -> "AdaptorConfig":
        """The config of a merged plugin holding every group of ``sources`` (configs of one kind) and new groups
        combined from members of the given configs. Default: the first source's."""
        return sources[0]

    def combine(self, members: Sequence[tuple[Group, "AdaptorConfig"]], strategy: str, density: float) -> Group:
        """One new group (under this, the merged config) from member groups, each with the config it was saved
        under. Default, elementwise: ``average`` is the mean; ``ties`` TIES-merges the members' differences from
        the identity (:func:`~mtcpeft.core.adaptors.merging.ties_merge`) and adds it back."""
        groups = [self.conform(g, c) for g, c in members]
        if strategy == "average":
            return [torch.stack(ts).mean(0) for ts in zip(*groups)]
        if strategy == "ties":
            return [self.identity + ties_merge([t - self.identity for t in ts], density) for ts in zip(*groups)]
        raise GroupMergeError(self.strategy_problem(strategy) or f"{self.name} cannot combine by {strategy!r}")

    @classmethod
    def strategy_problem(cls, strategy: str) -> str | None:
        """Why this kind's groups cannot combine by ``strategy`` (naming what it does and the kind's own), or None."""
        if strategy in cls.strategies:
            return None
        defined = [ADAPTORS.get(k).strategies[strategy] for k in ADAPTORS if strategy in ADAPTORS.get(k).strategies]
        does = defined[0] if defined else "is not a merge strategy"
        own = " or ".join(s for s in cls.strategies if s != "keep")
        return f"strategy {strategy!r} {does}; for {cls.name} use {own}"


def adaptor_config(kind: str, **kwargs) -> AdaptorConfig:
    """Build a registered adaptor config by name, e.g. ``adaptor_config("lora", rank=64)``."""
    cls = ADAPTORS.get(kind)
    try:
        return cls(**kwargs)
    except TypeError as e:
        fields = ", ".join(f for f in cls.__dataclass_fields__) or "(none)"
        raise TypeError(f"adaptor {kind!r} got bad options {sorted(kwargs)}: {e}; its options are {fields}") from None


def projection_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    raise TypeError(
        f"cannot adapt a {type(module).__name__}: only nn.Linear and transformers' Conv1D projections are supported"
    )


class ContextLayer(nn.Module):
    """A frozen projection plus per-context parameters; subclasses implement :meth:`adapt`.

    ``forward(x)``: x (..., d_in) -> (..., d_out), reading the routing plan of the shared router.
    """

    adaptor_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Module, router: Router, config: AdaptorConfig, role: str = "proj", name: str = ""):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = projection_dims(base)
        self.num_contexts = router.num_contexts
        self.role = role
        self._router = router  # a plain attribute: shared by all layers, not a submodule
        self._where = name or type(base).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._router.plan_for(x.shape[:-1].numel(), self._where)
        return self.adapt(x, plan)

    def adapt(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"contexts={self.num_contexts}, role={self.role}"


def per_token_vectors(table: torch.Tensor, plan: RoutingPlan, identity: float) -> torch.Tensor:
    """Per-token rows of ``table`` (C, D): (D,) on the uniform path without -1 tokens, else (N, D).

    Tokens with context -1 get a row filled with ``identity`` (0 for an added bias, 1 for a scale). This is a
    lookup, not a loop over contexts: its cost does not depend on C.
    """
    if plan.uniform is not None and plan.live_mask is None:
        return table[plan.uniform]
    ident = table.new_full((1, table.shape[1]), identity)
    return F.embedding(plan.lookup_index, torch.cat([ident, table], dim=0))
