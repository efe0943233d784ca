"""The "none" adaptor: nothing is injected and the LM stays frozen (the paper's no-fine-tuning baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import AdaptorConfig, register_adaptor


@register_adaptor("none")
@dataclass
class NoAdaptorConfig(AdaptorConfig):
    """No options: the LM is used as it is (only a projector, if any, trains)."""
