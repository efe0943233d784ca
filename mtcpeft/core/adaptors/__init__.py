"""Adaptor kinds, one file each, registered by name in :data:`ADAPTORS` ("lora", "bitfit", "ia3", "none"; and
"mixed": groups of several kinds in one model).

A new kind is one file holding its config (a dataclass deriving from :class:`AdaptorConfig`) and its layer (a
:class:`ContextLayer`), registered with :func:`register_adaptor`; plugins, the merger and training reach it through
:data:`ADAPTORS` and never name it.
"""
from . import bitfit, ia3, lora, mixed, none  # noqa: F401  (registration side effects)
from .base import (ADAPTORS, AdaptorConfig, ContextLayer, Group, OptionError, adaptor_config, per_token_vectors,
                   projection_dims, register_adaptor)
from .bitfit import BitFitConfig, ContextBitFitLayer
from .ia3 import ContextIA3Layer, IA3Config
from .lora import ContextLoRALayer, LoRAConfig
from .mixed import MixedConfig, MixedLayer, compose_kinds
from .merging import GroupMergeError, low_rank, pad_rows, ties_merge
from .none import NoAdaptorConfig

__all__ = [
    "ADAPTORS", "AdaptorConfig", "ContextLayer", "Group", "OptionError", "adaptor_config", "per_token_vectors",
    "projection_dims", "register_adaptor", "BitFitConfig", "ContextBitFitLayer", "IA3Config", "ContextIA3Layer",
    "LoRAConfig", "ContextLoRALayer", "NoAdaptorConfig", "MixedConfig", "MixedLayer", "compose_kinds",
    "GroupMergeError", "low_rank", "pad_rows", "ties_merge",
]
