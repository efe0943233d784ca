"""Unified models of mixed adaptor kinds (issue 12 item 2): caption LoRA + QA IA3 + a BitFit plugin merge into one
model whose every group keeps its kind. Under each source task's routing the unified model equals that task's
plugin exactly (alone and in mixed batches, in forward and in generation), gradients reach only each token's group,
the plugin round-trips through load_model, joint fine-tuning runs on it and changes only the groups it trains, and
what really cannot combine (another base LM, one group of two kinds) is refused with the reason."""
import json

import pytest
import torch

from conftest import VOCAB, tiny_lm
from mtcpeft.core.adaptors import MixedConfig
from mtcpeft.experiments.params import count_adaptor_params
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.manifest import load_plugin
from mtcpeft.plugins.merge import MergeError, load_sources, merge_plugins, merge_to_dir, route_map
from support.plugins import save_source, source_model

ROUTES = ["vqa.image=caption.image", "vqa.question=qa.question", "vqa.answer=qa.answer"]


def _sources(tmp_path, base_seed=0):
    caption = source_model("lora", "image,text", 1, base_seed=base_seed)
    qa = source_model("ia3", "question,answer", 2, base_seed=base_seed)
    tag = source_model("bitfit", "label", 3, base_seed=base_seed)
    dirs = [save_source(tmp_path, caption, "caption", generated_context="text"),
            save_source(tmp_path, qa, "qa", generated_context="answer"),
            save_source(tmp_path, tag, "tag", generated_context="label")]
    return {"caption": caption, "qa": qa, "tag": tag}, dirs


def _inputs(n_ctx, seed, batch=3, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    ctx = torch.randint(0, n_ctx, (batch, length), generator=g)
    ctx[:, -2:] = -1  # padding takes no adaptor
    return ids, ctx


def _logits(model, ids, ctx):
    with torch.no_grad():
        return model(ids, context_ids=ctx).logits


@pytest.fixture
def unified(tmp_path):
    sources, dirs = _sources(tmp_path)
    out, manifest = merge_to_dir(tmp_path / "unified", [f"caption={dirs[0]}", f"qa={dirs[1]}", f"tag={dirs[2]}"],
                                 ROUTES)
    return sources, out, manifest


def test_the_manifest_records_the_kind_of_each_group_and_each_kind_keeps_its_targets(unified):
    sources, out, manifest = unified
    assert manifest.adaptor.kind == "mixed" and manifest.merge.exact
    kinds = dict(zip(manifest.contexts, manifest.adaptor.options["kinds"]))
    assert kinds == {"caption.image": "lora", "caption.text": "lora", "qa.question": "ia3", "qa.answer": "ia3",
                     "tag.label": "bitfit"}
    assert manifest.adaptor.options["kind_options"]["lora"] == sources["caption"].adaptor.options()
    # each kind acts where its own placement puts it: IA3 only on k/v outputs and the down projection's input
    for name, source in sources.items():
        kind = source.adaptor.name
        assert sorted(t.rpartition(".")[0] for t in manifest.targets if t.endswith("." + kind)) == \
            sorted(source.target_names)
    saved, tensors = load_plugin(out)  # validated on reading: leading dims are each kind's own group count
    assert tensors["lm.model.model.layers.0.self_attn.k_proj.lora.lora_A"].shape[0] == 2
    assert tensors["lm.model.model.layers.0.self_attn.k_proj.ia3.ia3_scale"].shape[0] == 2
    assert tensors["lm.model.model.layers.0.self_attn.k_proj.bitfit.bitfit_bias"].shape[0] == 1
    assert "lm.model.model.layers.0.self_attn.q_proj.ia3.ia3_scale" not in tensors
    # the merged model holds exactly the sources' parameters, no padding groups
    model = load_model(out, tiny_lm("llama")).model.lm
    assert count_adaptor_params(model) == sum(count_adaptor_params(s) for s in sources.values())


def test_under_each_source_tasks_routing_the_unified_model_equals_that_tasks_plugin(unified):
    sources, out, manifest = unified
    model = load_model(out, tiny_lm("llama")).model.lm  # save -> load_model round trip
    assert isinstance(model.adaptor, MixedConfig)
    for task, source in sources.items():
        ids, ctx = _inputs(len(source.vocab), seed=len(task))
        remapped = route_map(manifest, task, source.vocab.names)[ctx + 1]
        assert torch.equal(_logits(model, ids, remapped), _logits(source, ids, ctx)), task
    # one batch mixing rows of every task: each row as its own task's plugin computes it
    rows = {task: _inputs(len(s.vocab), seed=7 + i, batch=1) for i, (task, s) in enumerate(sources.items())}
    ids = torch.cat([r[0] for r in rows.values()])
    ctx = torch.cat([route_map(manifest, t, sources[t].vocab.names)[c + 1] for t, (_, c) in rows.items()])
    mixed = _logits(model, ids, ctx)
    for row, (task, (i, c)) in enumerate(rows.items()):
        torch.testing.assert_close(mixed[row], _logits(sources[task], i, c)[0], atol=1e-5, rtol=1e-5)


def test_gradient_reaches_only_the_group_of_each_token(unified):
    _, out, manifest = unified
    model = load_model(out, tiny_lm("llama")).model.lm.train()
    ids, _ = _inputs(1, 0)
    for group in manifest.contexts:
        model.zero_grad(set_to_none=True)
        ctx = torch.full_like(ids, manifest.contexts.index(group))
        model(ids, context_ids=ctx).logits.square().mean().backward()
        kinds = manifest.adaptor.options["kinds"]
        for name, layer in model.context_layers():
            mine = [c for c, k in zip(manifest.contexts, kinds) if k == name.rpartition(".")[2]]
            for p in layer.adaptor_param_names:
                grad = getattr(layer, p).grad
                for i, c in enumerate(mine):
                    moved = grad is not None and bool(grad[i].abs().sum() > 0)
                    if c != group:
                        assert not moved, (group, name, p, c)
        touched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert touched and all(n.endswith(tuple(("." + k + ".") + q for k in [kinds[manifest.contexts.index(group)]]
                                                for q in ("lora_A", "lora_B", "ia3_scale", "bitfit_bias")))
                               for n in touched), group


def test_generation_on_the_unified_model_equals_each_source_alone(unified):
    sources, out, manifest = unified
    model = load_model(out, tiny_lm("llama")).model.lm
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    prompts, alone, gen = [], [], []
    for i, (task, source) in enumerate(sources.items()):
        ids, ctx = _inputs(len(source.vocab), seed=20 + i, batch=1, length=6)
        ctx[:] = ctx.clamp(min=0)  # no padding: rows of one length
        task_gen = source.vocab.names[-1]  # text / answer / label
        alone.append(source.generate(ids, context_ids=ctx, generated_context=task_gen, **common))
        prompts.append((ids, route_map(manifest, task, source.vocab.names)[ctx + 1]))
        gen.append(manifest.generated[task])
    ids, ctx = torch.cat([p[0] for p in prompts]), torch.cat([p[1] for p in prompts])
    batched = model.generate(ids, context_ids=ctx, generated_context=gen, **common)
    assert torch.equal(batched, torch.cat(alone))


def test_refusals_that_remain_name_the_reason(tmp_path):
    (_, dirs), (_, other) = _sources(tmp_path / "a"), _sources(tmp_path / "b", base_seed=1)
    with pytest.raises(MergeError, match=r"plugin 'qa' .* was trained on another base LM than 'caption'"):
        merge_plugins(load_sources([f"caption={dirs[0]}", f"qa={other[1]}"]))
    with pytest.raises(MergeError, match=r"cannot merge a lora plugin \('caption'\) with a ia3 plugin \('qa'\) into "
                                         r"one group 'vqa.question' .*different functions"):
        merge_plugins(load_sources([f"caption={dirs[0]}", f"qa={dirs[1]}"]),
                      ["vqa.question=caption.text+qa.question"], "average")
    # groups of one kind still combine inside a mixed merge, by that kind's own strategy
    manifest, tensors = merge_plugins(load_sources([f"caption={dirs[0]}", f"qa={dirs[1]}"]),
                                      ["vqa.text=qa.question+qa.answer"], "average")
    assert manifest.adaptor.options["kinds"] == ["lora", "lora", "ia3", "ia3", "ia3"]
    t = tensors["lm.model.model.layers.0.self_attn.v_proj.ia3.ia3_scale"]
    torch.testing.assert_close(t[2], (t[0] + t[1]) / 2)


def test_joint_fine_tuning_on_a_mixed_plugin_changes_only_the_trained_groups(tiny_lm_dir, tmp_path):
    from support.joint import joint_overrides

    caption = _task_plugin(tiny_lm_dir, tmp_path / "caption", "caption", "lora", 1)
    qa = _task_plugin(tiny_lm_dir, tmp_path / "qa", "qa", "ia3", 2)
    plugin, manifest = merge_to_dir(tmp_path / "merged", [("caption", str(caption)), ("qa", str(qa))], ROUTES)
    assert manifest.adaptor.kind == "mixed"
    out = tmp_path / "joint"
    _train_joint().main(["--plugin", str(plugin), "--tasks", "qa", "--eval-limit", "2",
                                       *joint_overrides(out)])
    saved = json.loads((out / "plugin" / "plugin.json").read_text())
    assert saved["adaptor"] == json.loads((plugin / "plugin.json").read_text())["adaptor"]
    _, before = load_plugin(plugin)
    _, after = load_plugin(out / "plugin")
    assert before.keys() == after.keys()
    ia3 = [k for k in before if k.endswith(".ia3.ia3_scale")]
    assert ia3 and any(not torch.equal(before[k], after[k]) for k in ia3)  # QA's groups trained
    assert all(torch.equal(before[k], after[k]) for k in before if k not in ia3)  # caption's LoRA and projector not
    load_model(out / "plugin")  # and the jointly trained plugin loads again


def _train_joint():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("launch_train_joint",
                                                  Path(__file__).resolve().parents[2] / "launch" / "train_joint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task_plugin(lm_dir, out, task_name, kind, seed):
    from conftest import tiny_overrides
    from mtcpeft.config import load_config
    from mtcpeft.training.build import build_task_model, task_plugin
    from support.joint import LAYOUT
    from tasks import get_task

    cfg = load_config(None, [*tiny_overrides(lm_dir, out), f"task={task_name}", f"adaptor.kind={kind}", *LAYOUT])
    task = get_task(task_name)
    torch.manual_seed(seed)
    model, _, _ = build_task_model(cfg, task)
    return task_plugin(model, cfg, task, out / "plugin")


def test_a_mixed_plugin_merges_again_with_another_kind(tmp_path):
    sources, dirs = _sources(tmp_path)
    first, _ = merge_to_dir(tmp_path / "first", [f"caption={dirs[0]}", f"qa={dirs[1]}"], ROUTES)
    again, manifest = merge_to_dir(tmp_path / "again", [str(first), f"tag={dirs[2]}"])
    direct, direct_manifest = merge_plugins(load_sources([f"caption={dirs[0]}", f"qa={dirs[1]}", f"tag={dirs[2]}"]),
                                            ROUTES)
    assert manifest.contexts == direct.contexts and manifest.adaptor == direct.adaptor
    assert manifest.routes == direct.routes
    _, tensors = load_plugin(again)
    assert tensors.keys() == direct_manifest.keys()
    assert all(torch.equal(tensors[k], direct_manifest[k]) for k in tensors)
    model = load_model(again, tiny_lm("llama")).model.lm
    for task, source in sources.items():
        ids, ctx = _inputs(len(source.vocab), seed=len(task))
        remapped = route_map(manifest, task, source.vocab.names)[ctx + 1]
        assert torch.equal(_logits(model, ids, remapped), _logits(source, ids, ctx)), task


def test_apply_plugin_fills_a_mixed_model_group_by_group(unified):
    from mtcpeft.plugins.merge import apply_plugin

    sources, out, manifest = unified
    model = load_model(out, tiny_lm("llama")).model.lm
    fresh = load_model(out, tiny_lm("llama")).model.lm
    with torch.no_grad():
        for t in fresh.adaptor_state_dict().values():
            t.zero_()
    for task, source in sources.items():
        plugin, tensors = load_plugin(out.parent / task)
        assert set(apply_plugin(fresh, plugin, tensors).values()) == {f"{task}.{c}" for c in source.vocab.names}
    own = fresh.adaptor_state_dict()
    assert all(torch.equal(own[k], v) for k, v in model.adaptor_state_dict().items())
    # a group of one kind cannot land in a group of another
    plugin, tensors = load_plugin(out.parent / "qa")
    with pytest.raises(MergeError, match="the plugin's 'question' is a ia3 group but the model's 'caption.image'"):
        apply_plugin(fresh, plugin, tensors, mapping={"question": "caption.image", "answer": "caption.text"})


def test_kinds_placed_by_different_targets_keep_their_own_placement(tmp_path):
    caption = source_model("lora", "image,text", 1, targets="A")
    qa = source_model("ia3", "question,answer", 2, targets="AF")
    dirs = [save_source(tmp_path, caption, "caption", "A"), save_source(tmp_path, qa, "qa", "AF")]
    out, manifest = merge_to_dir(tmp_path / "unified", [f"caption={dirs[0]}", f"qa={dirs[1]}"])
    own = {k: manifest.adaptor.options["placements"].get(k, manifest.placement) for k in ("lora", "ia3")}
    assert own == {"lora": "A", "ia3": "AF"}
    model = load_model(out, tiny_lm("llama")).model.lm
    assert not any(".mlp." in t for t in model.target_names if t.endswith(".lora"))
    for task, source in (("caption", caption), ("qa", qa)):
        ids, ctx = _inputs(len(source.vocab), seed=len(task))
        remapped = route_map(manifest, task, source.vocab.names)[ctx + 1]
        assert torch.equal(_logits(model, ids, remapped), _logits(source, ids, ctx)), task
    # merged again, each kind keeps its placement
    again, again_manifest = merge_to_dir(tmp_path / "again", [str(out)])
    assert again_manifest.adaptor == manifest.adaptor
