"""What every adaptor kind shares: the config base, the wrapped-projection layer, per-token vector lookup.

An adaptor kind is one file holding a config dataclass and a layer class, registered with
:func:`register_adaptor`. A layer wraps one frozen projection (``nn.Linear`` or GPT-2's ``Conv1D``), keeps
its trainable tensors stacked over contexts (leading dim C) and declares their names in
``adaptor_param_names``: freezing, saving, merging and counting are generic code that reads that tuple.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtcpeft.core.contexts import Router, RoutingPlan
from mtcpeft.registry import Registry

ADAPTORS: Registry[type["AdaptorConfig"]] = Registry("adaptor")


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
    # "ia3" (keys/values scaled at the output, the FFN intermediate at the down projection's input)
    placement: ClassVar[str] = "proj"

    def to_dict(self) -> dict:
        return {"kind": self.name, **asdict(self)}


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
