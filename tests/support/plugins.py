"""Tiny context models with random adaptor groups, saved as task plugins (shared by the plugin tests)."""
from __future__ import annotations

from conftest import tiny_lm
from mtcpeft import ContextModel, LoRAConfig
from mtcpeft.plugins.manifest import save_context_plugin
from support.reference import randomize_adaptors


def source_model(kind, contexts, seed, rank=4, alpha=8.0, targets="AF", family="llama", base_seed=0):
    adaptor = LoRAConfig(rank=rank, alpha=alpha) if kind == "lora" else kind
    model = ContextModel(tiny_lm(family, seed=base_seed), contexts, adaptor, targets).eval()
    randomize_adaptors(model, scale=0.3, seed=seed)
    return model


def save_source(tmp_path, model, task, targets="AF", **extra):
    return save_context_plugin(tmp_path / task, model, task, targets, base_lm="tiny", **extra)


def plugin_pair(tmp_path, kind="lora", qa_rank=4, qa_alpha=8.0, family="llama", caption_targets="AF", qa_targets="AF"):
    caption = source_model(kind, "image,text", 1, targets=caption_targets, family=family)
    qa = source_model(kind, "question,answer", 2, rank=qa_rank, alpha=qa_alpha, targets=qa_targets, family=family)
    return (caption, save_source(tmp_path, caption, "caption", caption_targets, generated_context="text"),
            qa, save_source(tmp_path, qa, "qa", qa_targets, generated_context="answer"))
