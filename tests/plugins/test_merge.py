"""The merger: a unified plugin reproduces every source task exactly, concat adds updates exactly, the
approximate strategies compute what they claim, and impossible merges are refused by name."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import VOCAB, tiny_lm
from mtcpeft import ContextModel, LoRAConfig
from mtcpeft.cli import run_cli
from mtcpeft.core.adaptors import GroupMergeError, ties_merge
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.merge import (MergeError, apply_plugin, load_sources, merge_plugins, merge_to_dir,
                           parse_route, projector_tensors, route_map, route_table)
from mtcpeft.plugins.manifest import ProjectorInfo, load_plugin, save_plugin
from support.plugins import plugin_pair as _pair, save_source as _save, source_model as _source

ROOT = Path(__file__).resolve().parents[2]
VQA = ["vqa.image=caption.image", "vqa.question=qa.question", "vqa.answer=qa.answer"]


def _load(plugin_dir, lm):
    """The ContextModel of a plugin over ``lm``, through the one loader."""
    return load_model(plugin_dir, lm).model.lm


def _logits(model, ids, ctx):
    with torch.no_grad():
        return model(ids, context_ids=ctx).logits


def _inputs(n_ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    ctx = torch.randint(0, n_ctx, (3, 10), generator=g)
    ctx[:, -2:] = -1  # padding takes no adaptor
    return ids, ctx


def _assert_reproduces(merged, manifest, task, source):
    """The merged model, fed the source task's context ids remapped by the routing table, gives its logits."""
    ids, ctx = _inputs(len(source.vocab), seed=len(task))
    remapped = route_map(manifest, task, source.vocab.names)[ctx + 1]
    torch.testing.assert_close(_logits(merged, ids, remapped), _logits(source, ids, ctx), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "bitfit", "ia3"])
def test_merged_plugin_reproduces_each_source_task_exactly(kind, tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, kind)
    out, manifest = merge_to_dir(tmp_path / "unified", [f"caption={cdir}", f"qa={qdir}"], VQA)
    assert manifest.contexts == ["caption.image", "caption.text", "qa.question", "qa.answer"]
    assert manifest.routes == {
        "caption": {"image": "caption.image", "text": "caption.text"},
        "qa": {"question": "qa.question", "answer": "qa.answer"},
        "vqa": {"image": "caption.image", "question": "qa.question", "answer": "qa.answer"},
    }
    assert manifest.generated == {"caption": "caption.text", "qa": "qa.answer"}
    assert [s.task for s in manifest.sources] == ["caption", "qa"] and manifest.merge.exact
    assert route_table(manifest, "vqa") == [0, 2, 3] and route_table(manifest, "qa", ["answer", "question"]) == [3, 2]
    merged = _load(out, tiny_lm("llama"))
    _assert_reproduces(merged, manifest, "caption", caption)
    _assert_reproduces(merged, manifest, "qa", qa)
    # routing matters: feeding qa's ids unmapped (into caption's groups) gives other logits
    ids, ctx = _inputs(2)
    assert not torch.allclose(_logits(merged, ids, ctx), _logits(qa, ids, ctx), atol=1e-4)


def test_lora_ranks_and_scales_are_padded_and_folded_exactly(tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, qa_rank=8, qa_alpha=4.0)  # scales 2 and 0.5
    manifest, tensors = merge_plugins(load_sources([cdir, qdir]), VQA)
    assert manifest.adaptor.options["rank"] == 8 and manifest.adaptor.options["alpha"] == 8.0  # scale 1: folded into B
    save_plugin(tmp_path / "u", manifest, tensors)
    merged = _load(tmp_path / "u", tiny_lm("llama"))
    _assert_reproduces(merged, manifest, "caption", caption)
    _assert_reproduces(merged, manifest, "qa", qa)
    # one shared scale is kept as it is (rank 4 alpha 4 and rank 8 alpha 8: scale 1 -> no folding)
    same = _source("lora", "image,text", 1, rank=4, alpha=4.0)
    c2 = _save(tmp_path / "same", same, "caption")
    q2 = _save(tmp_path / "same", _source("lora", "question,answer", 2, rank=8, alpha=8.0), "qa")
    manifest, tensors = merge_plugins(load_sources([c2, q2]))
    assert (manifest.adaptor.options["rank"], manifest.adaptor.options["alpha"]) == (8, 8.0)
    name = "lm.model.model.layers.1.mlp.up_proj.lora_B"
    assert torch.equal(tensors[name][:2, :4], same.adaptor_state_dict()[name[9:]])  # no rescaling
    assert not tensors[name][:2, 4:].any()  # zero padding


def _delta(layer, c):
    """The dense update of group c of a context layer, (d_in, d_out), from its parameters by hand."""
    if hasattr(layer, "lora_A"):
        return layer.scale * layer.lora_A[c].t() @ layer.lora_B[c]
    raise TypeError(type(layer))


def _with_deltas(family, *groups):
    """A plain LM whose frozen weights absorb the updates of (ContextModel, context) groups: W += sum of deltas."""
    lm = tiny_lm(family)
    with torch.no_grad():
        for model, c in groups:
            for name, layer in model.context_layers():
                base = lm.get_submodule(name)
                d = _delta(layer, model.vocab.id(c))
                base.weight += d if type(base).__name__ == "Conv1D" else d.t()  # Conv1D stores (d_in, d_out)
    return lm


@pytest.mark.parametrize("family, qa_rank", [("llama", 4), ("llama", 8), ("gpt2", 8)])
def test_concat_group_adds_both_updates_exactly(family, qa_rank, tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, qa_rank=qa_rank, qa_alpha=4.0, family=family)
    routes = ["vqa.image=caption.image", "vqa.question=qa.question+caption.text", "vqa.answer=qa.answer"]
    manifest, tensors = merge_plugins(load_sources([cdir, qdir]), routes, "concat")
    assert manifest.contexts[-1] == "vqa.question" and manifest.routes["vqa"]["question"] == "vqa.question"
    assert manifest.adaptor.options["rank"] == 4 + qa_rank and manifest.merge.exact
    save_plugin(tmp_path / "u", manifest, tensors)
    merged = _load(tmp_path / "u", tiny_lm(family))
    ids, _ = _inputs(1)
    reference = _with_deltas(family, (qa, "question"), (caption, "text"))
    with torch.no_grad():
        want = reference(ids).logits
    got = _logits(merged, ids, torch.full_like(ids, manifest.contexts.index("vqa.question")))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _logits(merged, ids, torch.full_like(ids, 1)), atol=1e-3)  # != caption.text alone
    _assert_reproduces(merged, manifest, "caption", caption)
    _assert_reproduces(merged, manifest, "qa", qa)


def test_ties_by_hand():
    t1, t2 = torch.tensor([0.5, -0.1, 0.3, -0.8]), torch.tensor([-0.4, 0.2, 0.1, -0.6])
    # density 0.5: t1 keeps 0.5, -0.8; t2 keeps -0.4, -0.6; signs elected +, 0, 0, -; agreeing means
    torch.testing.assert_close(ties_merge([t1, t2], 0.5), torch.tensor([0.5, 0.0, 0.0, -0.7]))
    # density 1: nothing trimmed; signs +, +, +, -
    torch.testing.assert_close(ties_merge([t1, t2], 1.0), torch.tensor([0.5, 0.2, 0.2, -0.7]))
    with pytest.raises(GroupMergeError, match=r"density must be in \(0, 1\]"):  # ties_merge lives with the kinds
        ties_merge([t1], 0.0)


@pytest.mark.parametrize("kind", ["bitfit", "ia3", "lora"])
@pytest.mark.parametrize("strategy", ["average", "ties"])
def test_approximate_strategies_compute_what_they_document(kind, strategy, tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, kind)
    manifest, tensors = merge_plugins(load_sources([cdir, qdir]), ["vqa.question=qa.question+caption.text"], strategy,
                                      density=0.5)
    assert manifest.merge.new_groups == {"vqa.question": ["qa.question", "caption.text"]}
    assert manifest.merge.exact is False
    new = manifest.contexts.index("vqa.question")
    qa_s, cap_s = qa.adaptor_state_dict(), caption.adaptor_state_dict()
    for name, layer in qa.context_layers():
        if kind == "lora":
            a1, b1, a2, b2 = qa_s[name + ".lora_A"][0], qa_s[name + ".lora_B"][0], cap_s[name + ".lora_A"][1], \
                cap_s[name + ".lora_B"][1]
            A, B = tensors[f"lm.model.{name}.lora_A"][new], tensors[f"lm.model.{name}.lora_B"][new]
            if strategy == "average":  # A and B averaged separately (same rank and scale here)
                torch.testing.assert_close(A, (a1 + a2) / 2)
                torch.testing.assert_close(B, (b1 + b2) / 2)
            else:  # the best rank-4 approximation of the TIES merge of the dense updates
                s = layer.scale
                target = ties_merge([s * a1.t() @ b1, s * a2.t() @ b2], 0.5).double()
                got = (s * A.t() @ B).double()
                tail = torch.linalg.svdvals(target)[4:]
                torch.testing.assert_close(torch.linalg.norm(got - target), tail.square().sum().sqrt(), rtol=1e-4,
                                           atol=1e-6)
                assert torch.linalg.matrix_rank(got, atol=1e-6) <= 4
            continue
        param = "bitfit_bias" if kind == "bitfit" else "ia3_scale"
        v1, v2 = qa_s[f"{name}.{param}"][0], cap_s[f"{name}.{param}"][1]
        ident = 1.0 if kind == "ia3" else 0.0
        want = (v1 + v2) / 2 if strategy == "average" else ident + ties_merge([v1 - ident, v2 - ident], 0.5)
        torch.testing.assert_close(tensors[f"lm.model.{name}.{param}"][new], want)


def test_nested_targets_merge_with_identity_groups(tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, caption_targets="A", qa_targets="AF")
    manifest, tensors = merge_plugins(load_sources([cdir, qdir]))
    assert manifest.placement == "AF" and len(manifest.targets) == len(qa.target_names)
    save_plugin(tmp_path / "u", manifest, tensors)
    merged = _load(tmp_path / "u", tiny_lm("llama"))
    _assert_reproduces(merged, manifest, "caption", caption)
    _assert_reproduces(merged, manifest, "qa", qa)
    _, c2, _, q2 = _pair(tmp_path / "disjoint", caption_targets="A", qa_targets="F")
    with pytest.raises(MergeError, match="adapt different layers .* only in 'qa'.*train with the same adaptor.targets"):
        merge_plugins(load_sources([c2, q2]))


def test_apply_plugin_fills_namespaced_groups_like_the_merger(tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, qa_rank=8, qa_alpha=4.0)
    out, manifest = merge_to_dir(tmp_path / "u", [cdir, qdir])
    unified = ContextModel(tiny_lm("llama"), manifest.contexts, LoRAConfig(rank=8, alpha=8.0), "AF").eval()
    for d in (cdir, qdir):
        apply_plugin(unified, *load_plugin(d))
    merged = _load(out, tiny_lm("llama"))
    for k, v in merged.adaptor_state_dict().items():
        torch.testing.assert_close(unified.adaptor_state_dict()[k], v, atol=0, rtol=0)


def test_a_merged_plugin_merges_again_keeping_its_routes(tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path, qa_rank=4)
    merge_to_dir(tmp_path / "u", [cdir, qdir], VQA[:1])
    extra = _source("lora", "passage", 3)
    edir = _save(tmp_path, extra, "summary")
    out, manifest = merge_to_dir(tmp_path / "u2", [f"base={tmp_path / 'u'}", edir],
                                 ["chat.passage=summary.passage"])
    assert manifest.contexts == ["caption.image", "caption.text", "qa.question", "qa.answer", "summary.passage"]
    assert set(manifest.routes) == {"caption", "qa", "vqa", "summary", "chat"}
    merged = _load(out, tiny_lm("llama"))
    _assert_reproduces(merged, manifest, "qa", qa)
    _assert_reproduces(merged, manifest, "summary", extra)


def _with_projector(tmp_path, name, model, weight):
    manifest, tensors = load_plugin(_save(tmp_path, model, name))
    manifest.projector = ProjectorInfo(kind="linear", in_dim=3, out_dim=32)
    return save_plugin(tmp_path / name, manifest, {**tensors, "projector.proj.weight": weight})


def test_plugins_without_adaptor_groups_and_bad_densities_are_refused_by_name(tmp_path):
    frozen = _save(tmp_path, ContextModel(tiny_lm("llama"), "image,text", "none", "AF"), "frozen")
    with pytest.raises(MergeError, match=r"plugin 'frozen' .* holds no adaptor groups \(kind 'none'\); only adaptor "
                                         r"plugins \(bitfit, ia3, lora\) merge"):
        merge_plugins(load_sources([frozen]))
    _, cdir, _, qdir = _pair(tmp_path)
    with pytest.raises(MergeError, match=r"TIES density must be in \(0, 1\], got 0"):
        merge_plugins(load_sources([cdir, qdir]), ["vqa.text=caption.text+qa.answer"], "ties", density=0)


def test_refusals_name_the_conflict(tmp_path):
    caption, cdir, qa, qdir = _pair(tmp_path)
    other = _save(tmp_path, _source("lora", "question,answer", 2, base_seed=1), "other")
    with pytest.raises(MergeError, match=r"plugin 'other' .* was trained on another base LM than 'caption': "
                                         r"fingerprints \w+ \('tiny'\) vs \w+"):
        merge_plugins(load_sources([cdir, other]))
    bitfit = _save(tmp_path, _source("bitfit", "question,answer", 2), "bf")
    # plugins of different kinds merge (tests/plugins/test_mixed_kinds.py); one group of two kinds cannot
    with pytest.raises(MergeError, match=r"cannot merge a lora plugin \('caption'\) with a bitfit plugin \('bf'\)"):
        merge_plugins(load_sources([cdir, bitfit]), ["vqa.text=caption.text+bf.answer"], "average")
    with pytest.raises(MergeError, match="strategy 'concat' concatenates LoRA ranks; for bitfit use average or ties"):
        merge_plugins(load_sources([bitfit]), strategy="concat")
    with pytest.raises(MergeError, match="two plugins are named 'caption'"):
        merge_plugins(load_sources([cdir, f"caption={qdir}"]))
    # projectors: two different ones need --projector; identical ones are one projector
    p1 = _with_projector(tmp_path / "p", "img1", caption, torch.ones(32, 3))
    p2 = _with_projector(tmp_path / "p", "img2", qa, torch.zeros(32, 3))
    p3 = _with_projector(tmp_path / "p", "img3", qa, torch.ones(32, 3))
    with pytest.raises(MergeError, match="plugins 'img1' and 'img2' carry different projectors; keep one with "
                                         "--projector img1"):
        merge_plugins(load_sources([p1, p2]))
    manifest, tensors = merge_plugins(load_sources([p1, p2]), projector="img2")
    assert torch.equal(projector_tensors(tensors)["proj.weight"], torch.zeros(32, 3))
    assert manifest.merge.projector_from == "img2" and manifest.projector.in_dim == 3
    assert merge_plugins(load_sources([p1, p3]))[0].merge.projector_from == "img1"
    with pytest.raises(MergeError, match="--projector 'caption': that plugin has no projector"):
        merge_plugins(load_sources([p1, cdir]), projector="caption")


@pytest.mark.parametrize("routes, strategy, message", [
    (["vqa.image=cap.image"], "keep", r"unknown task 'cap' in route 'vqa.image=cap.image'; source tasks: caption, qa"),
    (["vqa.image=caption.question"], "keep", "unknown context 'question' of task 'caption' in route "
                                             "'vqa.image=caption.question'; its contexts: image, text"),
    (["vqa.question=qa.question+caption.text"], "keep", "names 2 groups but strategy 'keep' needs exactly one"),
    (["vqa.image=caption.image", "vqa.image=caption.text"], "keep", "vqa.image is routed twice"),
    (["caption.image=qa.question"], "keep", "'caption' is a source task whose contexts route to its own groups"),
    (["vqa.image"], "keep", r"bad route 'vqa.image': routes read TASK.CONTEXT=SOURCE.CONTEXT"),
    (["vqa=caption.image"], "keep", "bad route"),
    (["vqa.q=qa.question++caption.text"], "average", "an empty group name around"),
    (["vqa.q=qa.question+qa.question"], "average", "names a group twice"),
    ([], "slerp", "unknown strategy 'slerp'; strategies: keep, average, ties, concat"),
])
def test_route_errors(routes, strategy, message, tmp_path):
    _, cdir, _, qdir = _pair(tmp_path)
    with pytest.raises(MergeError, match=message):
        merge_plugins(load_sources([cdir, qdir]), routes, strategy)


def test_route_table_errors_and_ordinary_plugins(tmp_path):
    _, cdir, _, qdir = _pair(tmp_path)
    manifest, _ = load_plugin(cdir)
    assert route_table(manifest, "caption") == [0, 1]  # an ordinary plugin routes its own task
    agnostic = _save(tmp_path, _source("lora", "shared", 1), "cap2", task_contexts=["image", "text"])
    assert route_table(load_plugin(agnostic)[0], "cap2") == [0, 0]
    with pytest.raises(MergeError, match="the plugin routes no task 'vqa'; routed tasks: caption"):
        route_table(manifest, "vqa")
    with pytest.raises(MergeError, match="task 'caption' has no route for context 'question'; routed: image, text"):
        route_table(manifest, "caption", ["image", "question"])
    assert parse_route("vqa.q = qa.question + caption.text").groups == ("qa.question", "caption.text")


def _merge_cli():
    spec = importlib.util.spec_from_file_location("merge_cli", ROOT / "launch" / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_and_yaml_spec_end_to_end(tmp_path, capsys):
    caption, cdir, qa, qdir = _pair(tmp_path)
    cli = _merge_cli()
    routes = ["vqa.image=caption.image", "vqa.question=qa.question+caption.text", "vqa.answer=qa.answer"]
    argv = [f"--plugin=caption={cdir}", f"--plugin=qa={qdir}", *(f"--route={r}" for r in routes),
            "--strategy", "concat", "--generated", "vqa.answer", "--out", str(tmp_path / "cli")]
    manifest = cli.main(argv)
    assert "route vqa: image -> caption.image, question -> vqa.question, answer -> qa.answer" in capsys.readouterr().out
    assert manifest.generated["vqa"] == "qa.answer"
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump({
        "plugins": {"caption": str(cdir), "qa": str(qdir)},
        "routes": {"vqa.image": "caption.image", "vqa.question": "qa.question+caption.text",
                   "vqa.answer": "qa.answer"},
        "strategy": "concat", "generated": "vqa.answer", "out": str(tmp_path / "yaml")}, sort_keys=False))
    cli.main(["--spec", str(spec)])
    a, ta = load_plugin(tmp_path / "cli")
    b, tb = load_plugin(tmp_path / "yaml")
    assert json.dumps(a.routes) == json.dumps(b.routes) and a.contexts == b.contexts
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # a --plugin NAME=DIR replaces the spec's plugin of that name (here: qa from a missing directory -> the real one)
    spec_data = yaml.safe_load(spec.read_text())
    spec_data["plugins"]["qa"], spec_data["out"] = str(tmp_path / "not-trained"), str(tmp_path / "over")
    spec.write_text(yaml.safe_dump(spec_data, sort_keys=False))
    cli.main(["--spec", str(spec), f"--plugin=qa={qdir}"])
    c, tc = load_plugin(tmp_path / "over")
    assert c.contexts == b.contexts and all(torch.equal(tc[k], tb[k]) for k in tb)
    merged = _load(tmp_path / "yaml", tiny_lm("llama"))
    _assert_reproduces(merged, a, "qa", qa)
    # user errors end in one line and exit status 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: {}\nroute: []\n")
    for args, message in [([f"--plugin=caption={cdir}", "--route=vqa.x=cap.image", "--out", str(tmp_path / "x")],
                           "error: unknown task 'cap'"),
                          (["--spec", str(bad)], "error: unknown key 'route' in the merge spec"),
                          ([f"--plugin={tmp_path / 'nowhere'}", "--out", str(tmp_path / "x")],
                           "is not a plugin directory")]:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: cli.main(args))
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

