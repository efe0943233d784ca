"""Backbones: the frozen causal LM (:mod:`.lm`); vision encoders and projectors live beside it."""
from .lm import (
    LMNotFoundError, LMSource, convert_gguf, load_config, load_lm, load_tokenizer, packaged_smollm2, resolve_lm,
)

__all__ = [
    "LMNotFoundError", "LMSource", "convert_gguf", "load_config", "load_lm", "load_tokenizer", "packaged_smollm2",
    "resolve_lm",
]
