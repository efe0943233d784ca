"""mtcpeft: multi-task Context-PEFT (per-token context adaptors for frozen causal LMs)."""
from mtcpeft.core.adaptors import (ADAPTORS, AdaptorConfig, BitFitConfig, IA3Config, LoRAConfig, adaptor_config,
                                   register_adaptor)
from mtcpeft.core.contexts import NO_CONTEXT, ContextIdsError, ContextVocab, RoutingPlan, build_plan
from mtcpeft.core.inject import PRESETS, TargetError, inject, resolve_targets
from mtcpeft.core.model import AdaptorStateError, ContextModel

__version__ = "0.1.0"
__all__ = [
    "ADAPTORS", "AdaptorConfig", "BitFitConfig", "IA3Config", "LoRAConfig", "adaptor_config", "register_adaptor",
    "NO_CONTEXT", "ContextIdsError", "ContextVocab", "RoutingPlan", "build_plan", "PRESETS", "TargetError", "inject",
    "resolve_targets", "AdaptorStateError", "ContextModel",
]
