"""A new adaptor kind is one class pair plus registration: defined here, in the test, it injects, trains from a
run config, counts, saves as a plugin, merges and loads, with no change to the injection, plugin, merge, training
or counting code (they reach a kind only through mtcpeft.core.adaptors.ADAPTORS)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_lm
from mtcpeft.config import load_config
from mtcpeft.core.adaptors import ADAPTORS, AdaptorConfig, ContextLayer, per_token_vectors, register_adaptor
from mtcpeft.core.model import ContextModel
from mtcpeft.experiments.params import count_adaptor_params
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.manifest import PluginError, load_plugin, save_context_plugin
from mtcpeft.plugins.merge import MergeError, load_sources, merge_plugins, merge_to_dir, route_map
from mtcpeft.training.build import build_context_lm


@dataclass
class GateConfig(AdaptorConfig):
    """Context-gate: one scalar per context and projection scaling its output (1 at init: the model unchanged)."""

    identity = 1.0


class ContextGateLayer(ContextLayer):
    """y = base(x) * g_c for a token of context c; gate (C, 1)."""

    adaptor_param_names = ("gate",)

    def __init__(self, base, router, config: GateConfig, role="proj", name=""):
        super().__init__(base, router, config, role, name)
        self.gate = nn.Parameter(base.weight.new_ones(self.num_contexts, 1))  # (C, 1)

    def adapt(self, x, plan):
        y = self.base_layer(x)  # (..., D)
        if plan.num_live == 0:
            return y
        g = per_token_vectors(self.gate.to(y.dtype), plan, identity=1.0)  # (1,) or (N, 1)
        return y * (g if g.dim() == 1 else g.view(*y.shape[:-1], 1))


GateConfig.layer_cls = ContextGateLayer


@pytest.fixture
def gate():
    register_adaptor("gate")(GateConfig)
    yield GateConfig
    ADAPTORS.unregister("gate")


def _model(contexts, seed):
    model = ContextModel(tiny_lm("llama"), contexts, "gate", "AF").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.context_layers():
            layer.gate.copy_(0.5 + torch.rand(layer.gate.shape, generator=g))
    return model


def _inputs(n_ctx, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    ctx = torch.randint(0, n_ctx, (2, 8), generator=g)
    ctx[:, -2:] = -1
    return ids, ctx


def _logits(model, ids, ctx):
    with torch.no_grad():
        return model(ids, context_ids=ctx).logits


def test_a_kind_defined_in_a_test_injects_counts_and_trains_from_a_config(gate, tiny_lm_dir):
    model = ContextModel(tiny_lm("llama"), ["image", "text"], "gate", "AF").eval()
    layers = dict(model.context_layers())
    assert layers and all(isinstance(layer, ContextGateLayer) for layer in layers.values())
    assert count_adaptor_params(model) == 2 * len(layers)  # one scalar per context and projection
    ids, ctx = _inputs(2, 0)
    torch.testing.assert_close(_logits(model, ids, ctx), _logits(tiny_lm("llama"), ids, None))  # identity at init
    with torch.no_grad():
        next(iter(layers.values())).gate[1] = 3.0
    assert not torch.allclose(_logits(model, ids, ctx), _logits(tiny_lm("llama"), ids, None))
    # the training builder reaches it by name through the run config, like any registered kind
    cfg = load_config(None, [f"model.lm={tiny_lm_dir}", "adaptor.kind=gate"])
    built = build_context_lm(cfg, SimpleNamespace(vocab=model.vocab, generated_context="text"))
    assert isinstance(built.adaptor, GateConfig)
    assert [n for n, p in built.named_parameters() if p.requires_grad] and all(
        n.endswith(".gate") for n, p in built.named_parameters() if p.requires_grad)


def test_a_kind_defined_in_a_test_saves_merges_and_loads(gate, tmp_path):
    caption, qa = _model(["image", "text"], 1), _model(["question", "answer"], 2)
    cdir = save_context_plugin(tmp_path / "caption", caption, "caption", "AF", base_lm="tiny")
    qdir = save_context_plugin(tmp_path / "qa", qa, "qa", "AF", base_lm="tiny")
    manifest, tensors = load_plugin(cdir)
    assert manifest.adaptor.kind == "gate" and all(t.shape[1:] == (1,) for t in tensors.values())
    # the generic shape check reads the kind's declared tensors
    name = next(iter(tensors))
    bad = dataclasses.replace(manifest, tensors={**manifest.tensors, name: [2]})
    with pytest.raises(PluginError, match=r"has shape \[2\]; a gate gate is 2-D \(contexts, width\)"):
        bad.validate()

    routes = ["vqa.image=caption.image", "vqa.question=qa.question", "vqa.answer=qa.answer"]
    out, merged_manifest = merge_to_dir(tmp_path / "unified", [f"caption={cdir}", f"qa={qdir}"], routes, "keep")
    assert merged_manifest.adaptor.kind == "gate" and merged_manifest.merge.exact
    merged = load_model(out, tiny_lm("llama")).model.lm
    assert isinstance(merged.adaptor, GateConfig)
    for task, source in (("caption", caption), ("qa", qa)):
        ids, ctx = _inputs(2, len(task))
        remapped = route_map(merged_manifest, task, source.vocab.names)[ctx + 1]
        torch.testing.assert_close(_logits(merged, ids, remapped), _logits(source, ids, ctx), atol=2e-6, rtol=1e-5)

    # the elementwise defaults combine its groups: average is the mean gate; concat is not defined for it
    avg, avg_tensors = merge_plugins(load_sources([cdir, qdir]), ["vqa.text=caption.text+qa.answer"], "average")
    assert avg.contexts[-1] == "vqa.text"
    for t in avg_tensors.values():
        torch.testing.assert_close(t[4], (t[1] + t[3]) / 2)
    with pytest.raises(MergeError, match="strategy 'concat' concatenates LoRA ranks; for gate use average or ties"):
        merge_plugins(load_sources([cdir, qdir]), ["vqa.text=caption.text+qa.answer"], "concat")
