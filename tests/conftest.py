"""Shared fixtures: tiny random causal LMs of several families (built from configs; nothing downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

import tasks  # noqa: F401  (registers the built-in tasks, as the launch scripts do)

VOCAB = 128


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                         **common)
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "opt", "qwen2"]


def tiny_lm(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny Llama (random weights) with a small BPE tokenizer: a local model folder like a real one."""
    from transformers import AutoModelForCausalLM

    from support.tokenizer import make_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = tiny_config("llama")
    cfg.vocab_size = 300
    # the LM is frozen, so its output head must be able to express confident predictions: with the default
    # initializer_range (0.02) a 32-wide random head caps every logit near 0.6 and no adaptor can lower perplexity
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    make_tokenizer(d)
    # a local encoder checkpoint, as users pass one: plugins can check and rebuild it
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_efficientnet", pretrained=False).state_dict(), str(d / "encoder.safetensors"))
    return str(d)


def tiny_overrides(lm_dir: str, out) -> list[str]:
    """Config overrides for a seconds-long caption run: tiny LM and timm test encoder on 48 easy-VQA captions."""
    return [
        f"model.lm={lm_dir}", "model.vision=test_efficientnet", f"model.vision_pretrained={lm_dir}/encoder.safetensors",
        "model.image_size=64", "data.source=easyvqa", "data.train_limit=48", "data.val_limit=16", "data.seq_len=32",
        "data.max_target_tokens=20", "train.batch_size=8", "train.epochs=2", "train.lr=2e-2", "train.log_every=1",
        f"output_dir={out}", "seed=0",
    ]
