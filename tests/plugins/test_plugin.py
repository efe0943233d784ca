"""Plugin directories: round trip, and every malformed plugin refused with a PluginError naming the problem."""
import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VOCAB, tiny_lm
from mtcpeft import ContextModel, LoRAConfig
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.manifest import (MANIFEST, TENSORS, AdaptorInfo, Manifest, PluginError, check_compatible,
                                      lm_fingerprint, load_plugin, save_context_plugin, save_plugin)
from support.reference import randomize_adaptors


def _model(kind="lora", contexts="image,text", seed=0, **opts):
    lm = tiny_lm("llama")
    adaptor = LoRAConfig(rank=4, alpha=8.0, **opts) if kind == "lora" else kind
    model = ContextModel(lm, contexts, adaptor, "AF").eval()
    randomize_adaptors(model, scale=0.3, seed=seed)
    return model


@pytest.fixture
def plugin(tmp_path):
    model = _model()
    return save_context_plugin(tmp_path / "p", model, "caption", "AF", base_lm="tiny-llama",
                               generated_context="text"), model


def _rewrite(d, edit_manifest=None, edit_tensors=None):
    manifest = json.loads((d / MANIFEST).read_text())
    tensors = load_file(str(d / TENSORS))
    if edit_manifest:
        edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors)
    (d / MANIFEST).write_text(json.dumps(manifest))
    save_file(tensors, str(d / TENSORS))


@pytest.mark.parametrize("kind", ["lora", "bitfit", "ia3"])
def test_round_trip_rebuilds_the_same_outputs(kind, tmp_path):
    model = _model(kind)
    save_context_plugin(tmp_path / "p", model, "caption", "AF", base_lm="tiny-llama")
    manifest, tensors = load_plugin(tmp_path / "p")
    assert manifest.contexts == ["image", "text"] and manifest.adaptor.kind == kind
    assert manifest.base_lm_fingerprint == lm_fingerprint(tiny_lm("llama"))
    own = model.adaptor_state_dict()
    assert set(tensors) == {"lm.model." + k for k in own}
    for k, v in own.items():
        assert torch.equal(tensors["lm.model." + k], v)
    rebuilt = load_model(tmp_path / "p", tiny_lm("llama")).model.lm
    ids = torch.randint(0, VOCAB, (2, 8))
    ctx = torch.randint(-1, 2, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, context_ids=ctx).logits, model(ids, context_ids=ctx).logits,
                                   atol=0, rtol=0)


def test_save_is_atomic_and_replaces_an_old_plugin(plugin, tmp_path):
    d, model = plugin
    save_context_plugin(d, _model(seed=5), "caption", "AF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary or .old directory left
    _, tensors = load_plugin(d)
    name = next(iter(model.adaptor_state_dict()))
    assert not torch.equal(tensors["lm.model." + name], model.adaptor_state_dict()[name])


@pytest.mark.parametrize("kill_at", ["ready", "old", "in"])
def test_a_save_killed_between_its_renames_leaves_a_loadable_plugin(plugin, tmp_path, monkeypatch, kill_at):
    """Replacing a plugin renames the finished copy to .ready, the old one aside, then the new one in: a kill at
    any of those renames leaves a plugin that loads (the new one once it was complete, else the old one)."""
    import os

    from mtcpeft import io

    d, old_model = plugin
    new_model = _model(seed=5)
    real_replace = os.replace

    def replace(src, dst):  # the kill hits the rename to .ready, the old copy's move aside, or the new one's move in
        stage = "in" if str(src).endswith(".ready") else str(dst).rpartition(".")[2]
        if stage == kill_at:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_context_plugin(d, new_model, "caption", "AF")
    monkeypatch.setattr(io.os, "replace", real_replace)
    _, tensors = load_plugin(d)
    want = (new_model if kill_at == "in" else old_model).adaptor_state_dict()
    name = next(iter(want))
    assert torch.equal(tensors["lm.model." + name], want[name])


A0 = "lm.model.model.layers.0.self_attn.q_proj.lora_A"
B0 = "lm.model.model.layers.0.self_attn.q_proj.lora_B"


@pytest.mark.parametrize("edit_manifest, edit_tensors, message", [
    (None, lambda t: t.pop(A0), f"missing tensor '{A0}' listed in the manifest"),
    (lambda m: m["tensors"].pop(A0), lambda t: t.pop(A0),
     f"missing tensor '{A0}': target 'model.layers.0.self_attn.q_proj' needs its lora_A"),
    (None, lambda t: t.update({A0: torch.zeros(2, 4, 31)}), rf"tensor {A0} has shape \[2, 4, 31\], manifest says "
                                                           r"\[2, 4, 32\]"),
    (lambda m: m["tensors"].update({A0: [3, 4, 32]}), lambda t: t.update({A0: torch.zeros(3, 4, 32)}),
     r"has leading dim 3 but the manifest lists 2 contexts \['image', 'text'\]"),
    (lambda m: m.update(contexts=["text"]), None, "has leading dim 2 but the manifest lists 1 contexts"),
    (lambda m: m["tensors"].update({B0: [2, 3, 32]}), lambda t: t.update({B0: torch.zeros(2, 3, 32)}),
     f"tensor '{B0}' has rank dim 3 but adaptor.rank is 4"),
    (lambda m: m.update(format_version=7), None, r"unknown plugin format version 7; this mtcpeft reads versions \[1\]"),
    (lambda m: m["adaptor"].update(kind="loha"), None, "unknown adaptor kind 'loha'; this mtcpeft knows"),
    (lambda m: m["adaptor"].update(rank=0), None, "bad adaptor options: LoRA rank must be a positive integer"),
    (lambda m: m.update(contexts=[]), None, "'contexts' must be a non-empty list"),
    (lambda m: m.update(contexts=["image", "image"]), None, r"'contexts' repeats \['image'\]"),
    (lambda m: m.pop("base_lm_fingerprint"), None, r"lacks required keys \['base_lm_fingerprint'\]"),
    (lambda m: m.update(generated_context="answer"), None, "generated_context 'answer' is not one of the contexts"),
    (lambda m: m["targets"].remove("model.layers.0.self_attn.q_proj"), None,
     f"tensor '{A0}' is an adaptor tensor of no listed target"),
    (lambda m: m.update(routes={"vqa": {"image": "caption.image"}}), None,
     r"route vqa.image -> 'caption.image' names no context of the plugin"),
])
def test_malformed_plugins_are_refused_by_name(plugin, edit_manifest, edit_tensors, message):
    d, _ = plugin
    _rewrite(d, edit_manifest, edit_tensors)
    with pytest.raises(PluginError, match=message):
        load_plugin(d)


@pytest.mark.parametrize("edit_manifest, message", [
    (lambda m: m.update(task=3), "field 'task' must be a string, got 3"),
    (lambda m: m.update(contexts="image,text"), "field 'contexts' must be a list, got 'image,text'"),
    (lambda m: m.update(targets=["model.layers.0.self_attn.q_proj", 7]), r"field 'targets\[1\]' must be a string"),
    (lambda m: m["adaptor"].update(full_finetune="no"), "field 'adaptor.full_finetune' must be true or false"),
    (lambda m: m["tensors"].update({A0: [2, "4", 32]}), rf"field 'tensors.{A0}\[1\]' must be an integer, got '4'"),
    (lambda m: m.update(layout={"seq_len": "128", "max_target_tokens": 63}),
     "field 'layout.seq_len' must be an integer, got '128'"),
    (lambda m: m.update(vision={"name": "test_efficientnet"}),
     r"field 'vision' lacks required keys \['pretrained', 'image_size'\]"),
    (lambda m: m.update(routes=["vqa"]), r"field 'routes' must be an object, got \['vqa'\]"),
    (lambda m: m.pop("targets"), r"the manifest lacks required keys \['targets'\]"),
    (lambda m: m.pop("adaptor"), r"the manifest lacks required keys \['adaptor'\]"),
])
def test_a_manifest_field_of_the_wrong_type_or_missing_is_refused_at_read_by_name(plugin, edit_manifest, message):
    d, _ = plugin
    _rewrite(d, edit_manifest)
    with pytest.raises(PluginError, match=message):
        Manifest.read(d)


def test_the_manifest_round_trips_through_its_json(plugin):
    d, _ = plugin
    raw = json.loads((d / MANIFEST).read_text())
    manifest = Manifest.read(d)
    assert manifest.to_json() == raw and Manifest.from_json(raw) == manifest


def test_corrupt_json_and_missing_files(plugin, tmp_path):
    d, _ = plugin
    (d / MANIFEST).write_text('{"task": "caption",')
    with pytest.raises(PluginError, match=r"plugin.json is not valid JSON"):
        Manifest.read(d)
    with pytest.raises(PluginError, match="is not a plugin directory: it needs plugin.json and adaptor.safetensors"):
        load_plugin(tmp_path / "nowhere")
    d2 = save_context_plugin(tmp_path / "q", _model(), "caption", "AF")
    (d2 / TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(PluginError, match="is not a readable safetensors file"):
        load_plugin(d2)


def test_save_refuses_a_manifest_it_could_not_load(tmp_path):
    with pytest.raises(PluginError, match=r"leading dim 3 but the manifest lists 2 contexts"):
        manifest = Manifest(task="t", contexts=["a", "b"], adaptor=AdaptorInfo("bitfit"), placement="q_proj",
                            targets=["q"], base_lm="", base_lm_fingerprint="")
        save_plugin(tmp_path / "bad", manifest, {"lm.model.q.bitfit_bias": torch.zeros(3, 4)})
    assert not (tmp_path / "bad").exists()


def test_check_compatible_names_the_mismatch(plugin):
    d, model = plugin
    manifest, tensors = load_plugin(d)
    check_compatible(manifest, base_lm_fingerprint=lm_fingerprint(model), model=model, tensors=tensors)
    other = tiny_lm("llama", seed=1)
    with pytest.raises(PluginError, match=r"trained on another base LM \('tiny-llama', fingerprint \w+\) than this "):
        check_compatible(manifest, base_lm_fingerprint=lm_fingerprint(other))
    with pytest.raises(PluginError, match="unknown plugin format version 2"):
        check_compatible(dataclasses.replace(manifest, format_version=2))
    wider = ContextModel(copy.deepcopy(other), "image,text", LoRAConfig(rank=8), "AF")
    with pytest.raises(PluginError, match=rf"tensor '{A0}' has shape \[2, 4, 32\] but the model needs \[2, 8, 32\]"):
        check_compatible(manifest, model=wider, tensors=tensors)
    attn = ContextModel(tiny_lm("llama"), "image,text", LoRAConfig(rank=4), "AF")
    fewer = {k: v for k, v in tensors.items() if "mlp" not in k}
    with pytest.raises(PluginError, match=r"missing tensor 'lm.model.model.layers.0.mlp.gate_proj.lora_A': the model "
                                          r"adapts 'model.layers.0.mlp.gate_proj'"):
        check_compatible(manifest, model=attn, tensors=fewer)
    with pytest.raises(PluginError, match="holds lora adaptors but the model has bitfit adaptors"):
        check_compatible(manifest, model=ContextModel(tiny_lm("llama"), "image,text", "bitfit", "AF"))
    with pytest.raises(PluginError, match=r"contexts \['image', 'text'\] differ from the model's \['question'\]"):
        check_compatible(manifest, model=ContextModel(tiny_lm("llama"), "question", LoRAConfig(rank=4), "AF"))
    manifest.validate()  # a sound manifest passes
