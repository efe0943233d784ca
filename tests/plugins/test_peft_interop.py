"""PEFT interop: a context group exported as a PEFT LoRA adapter computes what our model computes, and a PEFT
adapter imported as a group computes what PEFT computes (PEFT, an independent implementation, is the oracle)."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import VOCAB, tiny_lm
from mtcpeft import ContextModel, LoRAConfig
from mtcpeft.cli import run_cli
from mtcpeft.plugins.manifest import load_plugin, save_context_plugin
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.merge import apply_plugin
from mtcpeft.plugins.peft import InteropError, export_peft, import_peft, peft_plugin
from support.reference import randomize_adaptors

ROOT = Path(__file__).resolve().parents[2]
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "opt": ["q_proj", "out_proj", "fc1"],
                "gpt2": ["c_attn", "mlp.c_proj"]}


def _ids(seed=7):
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_exported_group_loads_in_peft_and_gives_our_outputs(family, tmp_path):
    base = tiny_lm(family)
    ours = ContextModel(copy.deepcopy(base), "image,text", LoRAConfig(rank=4, alpha=8.0), "AF").eval()
    randomize_adaptors(ours, scale=0.3)  # B nonzero: a trained-looking adaptor
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in ours.context_layers())
    ids = _ids()
    for ctx in ("image", "text"):
        out = export_peft(ours, ctx, tmp_path / ctx)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        want = _logits(ours, ids, context_ids=torch.full_like(ids, ours.vocab.id(ctx)))
        torch.testing.assert_close(_logits(peft_model, ids), want, atol=1e-5, rtol=1e-5)
    # the two groups differ, so the comparison could fail for a wrong group
    assert not torch.allclose(_logits(ours, ids, context_ids=torch.zeros_like(ids)),
                              _logits(ours, ids, context_ids=torch.ones_like(ids)))
    config = json.loads((tmp_path / "text" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8.0, family == "gpt2")


def _cli():
    spec = importlib.util.spec_from_file_location("export_peft_cli", ROOT / "launch" / "export_peft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_cli_from_a_plugin_directory_uses_its_prefix_and_base_lm(tmp_path, capsys):
    base = tiny_lm("llama")
    ours = ContextModel(copy.deepcopy(base), "question,answer", LoRAConfig(rank=2, alpha=6.0), "A").eval()
    randomize_adaptors(ours, scale=0.3, seed=3)
    save_context_plugin(tmp_path / "plugin", ours, "qa", "A", base_lm="tiny-llama")
    cli = _cli()
    out = cli.main(["--plugin", str(tmp_path / "plugin"), "--context", "answer", "--out", str(tmp_path / "peft")])
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: cli.main(["--plugin", str(tmp_path / "plugin"), "--context", "image", "--out",
                                  str(tmp_path / "x")]))
    assert e.value.code == 2 and "error: unknown context 'image'" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ids = _ids(1)
    torch.testing.assert_close(_logits(peft_model, ids), _logits(ours, ids, context_ids=torch.ones_like(ids)),
                               atol=1e-5, rtol=1e-5)


def _random_peft(family, tmp_path, **config):
    base = tiny_lm(family)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=PEFT_TARGETS[family],
                                                               fan_in_fan_out=family == "gpt2", **config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    return base, peft_model.eval()


@pytest.mark.parametrize("family, config", [
    ("llama", dict(r=4, lora_alpha=8)),
    ("opt", dict(r=4, lora_alpha=8)),
    ("gpt2", dict(r=4, lora_alpha=8)),
    # per-module ranks and alphas and rsLoRA: scales folded into B, ranks zero-padded
    ("llama", dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
    ("opt", dict(r=3, lora_alpha=5, use_rslora=True)),
])
def test_imported_peft_adapter_gives_peft_outputs(family, config, tmp_path):
    base, peft_model = _random_peft(family, tmp_path, **config)
    imported, tensors = import_peft(tmp_path / "peft", "answer", lm=base)
    a = imported.adaptor.options
    ours = ContextModel(copy.deepcopy(base), imported.contexts, LoRAConfig(rank=a["rank"], alpha=a["alpha"]),
                        imported.targets).eval()
    assert ours.target_names == imported.targets  # model order
    ours.load_adaptor_state_dict({k.removeprefix("lm.model."): v for k, v in tensors.items()})
    ids = _ids(2)
    torch.testing.assert_close(_logits(ours, ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)


def test_imported_adapter_becomes_one_group_of_a_plugin(tmp_path):
    """peft_plugin -> a plugin; loaded into a two-context model by name, the group takes PEFT's outputs and the
    other group keeps its own."""
    base, peft_model = _random_peft("llama", tmp_path, r=4, lora_alpha=8)
    peft_plugin(tmp_path / "peft", tmp_path / "plugin", base, task="qa", context="answer")
    manifest, tensors = load_plugin(tmp_path / "plugin")
    assert manifest.contexts == ["answer"] and manifest.adaptor.options["rank"] == 4
    model = load_model(tmp_path / "plugin", copy.deepcopy(base)).model.lm
    ids = _ids(3)
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)

    two = ContextModel(copy.deepcopy(base), "qa.question,qa.answer", LoRAConfig(rank=8, alpha=8.0),
                       manifest.targets).eval()
    randomize_adaptors(two, seed=9)
    before = _logits(two, ids, context_ids=torch.zeros_like(ids))
    apply_plugin(two, manifest, tensors)  # "answer" of task "qa" -> "qa.answer"; rank 4 padded into rank 8
    torch.testing.assert_close(_logits(two, ids, context_ids=torch.ones_like(ids)), _logits(peft_model, ids),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(two, ids, context_ids=torch.zeros_like(ids)), before)


def test_refusals_name_the_problem(tmp_path):
    base = tiny_lm("llama")
    bitfit = ContextModel(copy.deepcopy(base), "a", "bitfit", "A")
    with pytest.raises(InteropError, match="only LoRA adaptors export to PEFT; this one is 'bitfit'"):
        export_peft(bitfit, "a", tmp_path / "x")
    lora = ContextModel(copy.deepcopy(base), "a", "lora", "A")
    with pytest.raises(InteropError, match=r"unknown context 'b'; this adaptor's contexts are \['a'\]"):
        export_peft(lora, "b", tmp_path / "x")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(InteropError, match=r"not a plain LoRA update: \['use_dora'\]"):
        import_peft(tmp_path / "dora")
    with pytest.raises(InteropError, match="is not a PEFT adapter folder"):
        import_peft(tmp_path)
    _random_peft("opt", tmp_path / "o", r=2, lora_alpha=2)
    with pytest.raises(InteropError, match="which this base LM does not have"):
        import_peft(tmp_path / "o" / "peft", lm=base)  # an OPT adapter against a llama
