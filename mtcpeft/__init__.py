"""mtcpeft: multi-task Context-PEFT (per-token context adaptors for frozen causal LMs)."""
from .adaptors import ADAPTORS, AdaptorConfig, BitFitConfig, IA3Config, LoRAConfig, adaptor_config
from .contexts import NO_CONTEXT, ContextIdsError, ContextVocab, RoutingPlan, build_plan
from .inject import PRESETS, TargetError, inject, resolve_targets
from .model import AdaptorStateError, ContextModel

__version__ = "0.1.0"
__all__ = [
    "ADAPTORS", "AdaptorConfig", "BitFitConfig", "IA3Config", "LoRAConfig", "adaptor_config", "NO_CONTEXT",
    "ContextIdsError", "ContextVocab", "RoutingPlan", "build_plan", "PRESETS", "TargetError", "inject",
    "resolve_targets", "AdaptorStateError", "ContextModel",
]
