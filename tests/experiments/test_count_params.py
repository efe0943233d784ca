"""Adaptor parameter counts against counts computed here, independently, from each config's layer widths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

from mtcpeft import ADAPTORS, ContextModel, adaptor_config
from mtcpeft.cli import run_cli as run_main
from mtcpeft.experiments.params import AGNOSTIC, count_adaptor_params, count_for, count_lm_params
from mtcpeft.models import load_lm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "count_params.py"
RANK = 4
CONTEXTS = {1: [AGNOSTIC], 2: ["image", "text"]}


def tiny_config(family: str):
    """Small but non-square widths (grouped-query attention, FFN width != 4 * hidden) so mix-ups show."""
    if family == "llama":
        return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen2":
        return Qwen2Config(vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=96, n_embd=24, n_layer=3, n_head=4, n_positions=64)
    if family == "opt":
        return OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=56, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, word_embed_proj_dim=32)
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "opt", "qwen2"]


def expected_shapes(cfg) -> dict[str, dict[str, list]]:
    """Per decoder layer: "A"/"F" -> [(d_in, d_out)] of the projections LoRA/BitFit wrap, and
    "ia3_A"/"ia3_F" -> [width scaled] (keys + values, FFN intermediate), from the config's numbers alone."""
    t = cfg.model_type
    if t in ("llama", "qwen2"):
        h, inter = cfg.hidden_size, cfg.intermediate_size
        hd = h // cfg.num_attention_heads
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        return {"A": [(h, q), (h, kv), (h, kv), (q, h)], "F": [(h, inter), (h, inter), (inter, h)],
                "ia3_A": [kv, kv], "ia3_F": [inter]}
    if t == "gpt2":
        e = cfg.n_embd
        inner = cfg.n_inner or 4 * e
        # c_attn is fused q|k|v: IA3 scales only its k and v thirds (2 * n_embd); the FFN intermediate is the
        # input of mlp.c_proj (4 * n_embd)
        return {"A": [(e, 3 * e), (e, e)], "F": [(e, inner), (inner, e)], "ia3_A": [2 * e], "ia3_F": [inner]}
    if t == "opt":
        h, f = cfg.hidden_size, cfg.ffn_dim
        return {"A": [(h, h)] * 4, "F": [(h, f), (f, h)], "ia3_A": [h, h], "ia3_F": [f]}
    raise ValueError(t)


def n_layers(cfg) -> int:
    return cfg.n_layer if cfg.model_type == "gpt2" else cfg.num_hidden_layers


# the count of one context on one layer, per kind; a newly registered kind must add its formula here
PER_LAYER = {
    "lora": lambda s, parts: sum(RANK * (d_in + d_out) for p in parts for d_in, d_out in s[p]),
    "bitfit": lambda s, parts: sum(d_out for p in parts for _, d_out in s[p]),
    "ia3": lambda s, parts: sum(w for p in parts for w in s["ia3_" + p]),
    "none": lambda s, parts: 0,
}


def expected_count(cfg, kind: str, targets: str, contexts: int) -> int:
    return contexts * n_layers(cfg) * PER_LAYER[kind](expected_shapes(cfg), list(targets))


def kind_options(kind: str) -> dict:
    return {"rank": RANK} if kind == "lora" else {}


def test_every_registered_kind_has_an_expected_formula():
    # a composite kind (mixed) counts its member kinds' layers: tests/plugins/test_mixed_kinds.py
    assert {k for k in ADAPTORS.names() if not ADAPTORS.get(k).composite} == set(PER_LAYER)


@pytest.mark.parametrize("contexts", [1, 2])
@pytest.mark.parametrize("targets", ["A", "F", "AF"])
@pytest.mark.parametrize("kind", sorted(PER_LAYER))
@pytest.mark.parametrize("family", FAMILIES)
def test_count_matches_layer_shapes(family, kind, targets, contexts):
    cfg = tiny_config(family)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in lm.parameters())
    count = count_for(lm, kind, CONTEXTS[contexts], targets, **kind_options(kind))
    assert count.trainable == expected_count(cfg, kind, targets, contexts)
    assert count.total_lm == total  # injection adds adaptors but no LM parameter
    assert count.percent == pytest.approx(100 * count.trainable / total)


@pytest.mark.parametrize("family", FAMILIES)
def test_counted_params_are_exactly_the_trainable_ones(family):
    """On a real (CPU) model: what is counted is what requires grad after injection, and nothing else."""
    cfg = tiny_config(family)
    model = ContextModel(AutoModelForCausalLM.from_config(cfg), "a,b,c", adaptor_config("lora", rank=RANK), "AF")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_adaptor_params(model) == trainable == model.num_adaptor_parameters()
    assert trainable == expected_count(cfg, "lora", "AF", 3)
    assert count_lm_params(model) == sum(p.numel() for p in model.parameters() if not p.requires_grad)


def test_meta_load_from_config_file_counts_the_same(tmp_path):
    cfg = tiny_config("qwen2")
    cfg.save_pretrained(tmp_path)
    lm = load_lm(tmp_path / "config.json", device="meta")
    assert next(lm.parameters()).device.type == "meta"
    assert count_for(lm, "ia3", "x,y", "AF").trainable == expected_count(cfg, "ia3", "AF", 2)


# ------------------------------------------------------------------------------------------------------ CLI
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The script as a user runs it, from another directory: the package is found without installing it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_json_on_a_saved_model(tmp_path):
    cfg = tiny_config("llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")
    out = run_cli("--model", str(tmp_path / "tiny"), "--adaptor", "lora", "--rank", str(RANK), "--targets", "AF",
                  "--contexts", "image,text", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)  # stdout holds the JSON object and nothing else
    assert got["trainable"] == expected_count(cfg, "lora", "AF", 2)
    assert got["contexts"] == ["image", "text"] and got["rank"] == RANK and got["adaptor"] == "lora"
    assert got["total_lm"] == AutoModelForCausalLM.from_config(cfg).num_parameters()
    assert got["percent"] == pytest.approx(100 * got["trainable"] / got["total_lm"], abs=1e-4)


def test_cli_random_init_on_a_config_only_dir(tmp_path):
    cfg = tiny_config("gpt2")
    cfg.save_pretrained(tmp_path / "cfg")
    out = run_cli("--model", str(tmp_path / "cfg"), "--adaptor", "ia3", "--targets", "AF", "--context-agnostic",
                  "--random-init", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["trainable"] == expected_count(cfg, "ia3", "AF", 1) == n_layers(cfg) * (2 * 24 + 4 * 24)
    assert got["contexts"] == [AGNOSTIC] and got["rank"] is None
    # without --random-init a folder with no weights is refused, and the message names the flag
    out = run_cli("--model", str(tmp_path / "cfg"), "--adaptor", "ia3", cwd=tmp_path)
    assert out.returncode != 0 and "--random-init" in out.stderr


def test_cli_table_and_option_checks(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import count_params
    finally:
        sys.path.remove(str(SCRIPT.parent))
    cfg = tiny_config("opt")
    cfg.save_pretrained(tmp_path)
    result = count_params.main(["--model", str(tmp_path), "--random-init", "--adaptor", "bitfit", "--targets", "F"])
    table = capsys.readouterr().out
    assert result["trainable"] == expected_count(cfg, "bitfit", "F", 2)
    assert f"{result['trainable']:,}" in table and "bitfit" in table and "image, text" in table
    with pytest.raises(SystemExit) as exit_:  # through run_cli, as the script's __main__ runs it
        run_main(lambda: count_params.main(["--model", str(tmp_path), "--random-init", "--adaptor", "bitfit",
                                            "--rank", "8"]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("error: ") and "no --rank option" in last


def test_cli_full_mode_counts_every_lm_weight(tmp_path, capsys):
    """--mode full counts full fine-tuning (train.mode=full): every LM weight, no adaptor."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import count_params
    finally:
        sys.path.remove(str(SCRIPT.parent))
    cfg = tiny_config("llama")
    cfg.save_pretrained(tmp_path)
    result = count_params.main(["--model", str(tmp_path), "--random-init", "--mode", "full", "--json"])
    total = AutoModelForCausalLM.from_config(cfg).num_parameters()
    assert result["trainable"] == result["total_lm"] == total and result["percent"] == 100.0
    assert (result["mode"], result["adaptor"]) == ("full", None)
    assert json.loads(capsys.readouterr().out)["trainable"] == total
