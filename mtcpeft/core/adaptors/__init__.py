"""Adaptor kinds, one file each, registered by name in :data:`ADAPTORS` ("lora", "bitfit", "ia3", "none")."""
from . import bitfit, ia3, lora, none  # noqa: F401  (registration side effects)
from .base import ADAPTORS, AdaptorConfig, ContextLayer, adaptor_config, per_token_vectors, projection_dims
from .bitfit import BitFitConfig, ContextBitFitLayer
from .ia3 import ContextIA3Layer, IA3Config
from .lora import ContextLoRALayer, LoRAConfig
from .none import NoAdaptorConfig

__all__ = [
    "ADAPTORS", "AdaptorConfig", "ContextLayer", "adaptor_config", "per_token_vectors", "projection_dims",
    "BitFitConfig", "ContextBitFitLayer", "IA3Config", "ContextIA3Layer", "LoRAConfig", "ContextLoRALayer",
    "NoAdaptorConfig",
]
