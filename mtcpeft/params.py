"""Count the parameters a context adaptor adds to an LM (shapes only: works on the meta device).

The count reads each :class:`~mtcpeft.adaptors.ContextLayer`'s declared ``adaptor_param_names``, so a new
adaptor kind is counted with no change here. Per context and targeted projection (d_in -> d_out): LoRA adds
r * (d_in + d_out), BitFit d_out, IA3 the width it scales; everything is multiplied by the number of contexts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .adaptors import AdaptorConfig, ContextLayer, adaptor_config
from .contexts import ContextVocab
from .model import ContextModel

AGNOSTIC = "all"  # the one context of context-agnostic PEFT


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
        from .models.lm import load_lm

        lm = load_lm(lm, device=torch.device("meta")) if random_init else load_lm(lm)
    if not isinstance(adaptor, str) and adaptor_kwargs:
        raise TypeError(f"options {sorted(adaptor_kwargs)} go with an adaptor kind name, not a built config")
    config = adaptor_config(adaptor, **adaptor_kwargs) if isinstance(adaptor, str) else adaptor
    return count_params(ContextModel(lm, contexts, config, targets))
