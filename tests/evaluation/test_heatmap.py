"""Attention heatmaps (mtcpeft/evaluation/heatmap.py, launch/heatmap.py): the map of a hand-built attention tensor against
explicit sums, span lookup and its errors, and heatmaps from a tiny trained plugin."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from mtcpeft.cli import run_cli
from mtcpeft.evaluation.heatmap import (
    HeatmapError, crop_box, eager_attention, encoder_grid, image_attention, overlay, span_attention, span_positions,
    sublist_index,
)

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


# -------------------------------------------------------------------------------------------- image_attention
def hand_attention() -> tuple[torch.Tensor, list[int], list[int]]:
    """2 heads, 9 positions: [BOS], 6 image tokens (positions 1..6, a 2x3 grid), 2 caption tokens (7, 8).
    Both caption tokens put most of their mass on image token 4 (cell row 1, col 1); head 1 also on token 0."""
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 9)
    logits[:, 7:, 5] += 6.0  # image token 4 sits at position 5
    logits[1, 7:, 1] += 5.0  # head 1: image token 0 (cell 0, 0) too
    return softmax_rows(logits), [7, 8], list(range(1, 7))


def test_image_attention_sums_queries_and_heads_on_the_grid():
    attn, queries, image = hand_attention()
    assert torch.allclose(attn.sum(-1), torch.ones(2, 9))  # probabilities, as the LM returns them
    raw = image_attention(attn, queries, image, (2, 3), normalise=False)
    expected = torch.zeros(2, 3)
    for h in range(2):
        for q in queries:
            for k, pos in enumerate(image):
                expected[k // 3, k % 3] += attn[h, q, pos]
    assert torch.allclose(raw, expected)
    heat = image_attention(attn, queries, image, (2, 3))
    assert heat.shape == (2, 3) and int(heat.argmax()) == 4  # row 1, col 1
    assert heat.max() == 1.0 and heat.min() == 0.0
    assert torch.allclose(heat, (expected - expected.min()) / (expected.max() - expected.min()))
    # one head alone; a batch of one is the same as no batch axis
    head1 = image_attention(attn, queries, image, (2, 3), heads=[1], normalise=False)
    assert torch.allclose(head1, attn[1][queries][:, image].sum(0).reshape(2, 3))
    assert torch.equal(image_attention(attn[None], queries, image, (2, 3)), heat)


def test_image_attention_known_mass_in_known_cell():
    """All of one query's mass on one image token: the map is 1 there and 0 elsewhere, whatever the grid."""
    attn = torch.zeros(1, 6, 6)
    attn[0, :, 0] = 1.0  # every row attends to [BOS] ...
    attn[0, 5] = 0.0
    attn[0, 5, 3] = 1.0  # ... except the caption token, which attends to image token 2 (position 3)
    for grid, cell in (((2, 2), (1, 0)), ((1, 4), (0, 2)), ((4, 1), (2, 0))):
        heat = image_attention(attn, [5], [1, 2, 3, 4], grid)
        want = torch.zeros(grid)
        want[cell] = 1.0
        assert torch.equal(heat, want)


def test_image_attention_errors():
    attn, queries, image = hand_attention()
    with pytest.raises(HeatmapError, match="6 image tokens do not fill a 2x2 grid"):
        image_attention(attn, queries, image, (2, 2))
    with pytest.raises(HeatmapError, match="batch of 2"):
        image_attention(torch.stack([attn, attn]), queries, image, (2, 3))
    with pytest.raises(HeatmapError, match="no query positions"):
        image_attention(attn, [], image, (2, 3))
    assert torch.equal(image_attention(torch.full((1, 4, 4), 0.25), [3], [1, 2], (1, 2)), torch.zeros(1, 2))


def test_encoder_grid_and_sublists():
    class Enc:
        grid = (2, 3)

    assert encoder_grid(Enc(), 6) == (2, 3)
    assert encoder_grid(object(), 49) == (7, 7)
    with pytest.raises(HeatmapError, match="square grid"):
        encoder_grid(object(), 6)
    assert sublist_index([5, 1, 2, 1, 2], [1, 2]) == 1 and sublist_index([1, 2], [2, 1]) is None
    assert sublist_index([1], []) is None


# ------------------------------------------------------------------------------------------------ spans
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from support.tokenizer import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)  # merges: ' red', ' circle', ...


def test_span_positions_find_the_words(tokenizer):
    text = "a red circle on a plain background."
    ids, pos = span_positions(tokenizer, text, "red circle")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[:3]] == ["a", " red", " circle"]  # "red circle" alone: "re", "d", ...
    assert pos == [1, 2]
    assert tokenizer.decode(ids[:pos[0]]).strip() == "a"
    ids, pos = span_positions(tokenizer, text, "a")  # at the start: no leading space
    assert pos[0] == 0 and tokenizer.decode([ids[p] for p in pos]) == "a"


@pytest.mark.parametrize("span, message", [
    ("blue", "span 'blue' is not in the text"),
    ("ed circ", "does not fall on token boundaries"),
    ("  ", "the span is empty"),
])
def test_span_errors(tokenizer, span, message):
    with pytest.raises(HeatmapError, match=message):
        span_positions(tokenizer, "a red circle on a plain background.", span)


def test_overlay_places_the_map_on_the_centre_square():
    image = Image.new("RGB", (40, 20), (128, 128, 128))
    assert crop_box(image.size) == (10, 0, 30, 20)
    out = overlay(image, torch.tensor([[1.0, 0.0]]), alpha=1.0)
    assert out.size == (40, 20)
    assert out.getpixel((0, 10)) == (128, 128, 128) and out.getpixel((39, 10)) == (128, 128, 128)  # outside the crop
    hot, cold = out.getpixel((11, 10)), out.getpixel((28, 10))  # jet: 1 is dark red, 0 dark blue
    assert hot[0] > 100 and hot[2] < 50 and cold[2] > 100 and cold[0] < 50


# ----------------------------------------------------------------------------------------- tiny plugins
@pytest.fixture(scope="module")
def trained_plugin(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("heat") / "run"
    # fp32, as every in-process run of the suite: accelerate fixes one precision per process at its first Accelerator
    load_script("train_task").main(["--task", "caption", *tiny_overrides(tiny_lm_dir, out), "train.epochs=1",
                                    "train.mixed_precision=no"])
    return out / "plugin"


@pytest.fixture(scope="module")
def image_path():
    from mtcpeft.data.easyvqa import easyvqa_captions

    return easyvqa_captions("val")[0]["image"]


@pytest.mark.slow
def test_span_attention_from_a_trained_plugin(trained_plugin, image_path):
    from mtcpeft.plugins.load import load_model
    from mtcpeft.data.dataset import open_image

    loaded = load_model(trained_plugin)
    model, tok, layout, task, manifest = loaded.model, loaded.tokenizer, loaded.layout, loaded.task, loaded.manifest
    lm = model.lm.model
    before = lm.config._attn_implementation
    assert before != "eager"  # the forward must switch kernels to get weights, and switch back
    text = "a red circle on a plain background."
    sa = span_attention(model, tok, layout, task, manifest, open_image(image_path), text, "red circle", layer=1)
    assert lm.config._attn_implementation == before
    T = model.encoder.num_tokens
    assert sa.image_positions == list(range(1, 1 + T)) and sa.grid == model.encoder.grid
    assert "".join(sa.span_tokens).strip() == "red circle"
    S = 1 + T + len(tok(text, add_special_tokens=False)["input_ids"])
    assert sa.attn.shape == (lm.config.num_attention_heads, S, S)
    # softmax rows: every query's mass over the keys is 1, nothing on future keys (causal)
    assert torch.allclose(sa.attn.sum(-1), torch.ones(sa.attn.shape[:2]), atol=1e-5)
    assert float(sa.attn.triu(1).abs().max()) == 0.0
    heat = sa.map()
    assert heat.shape == model.encoder.grid and heat.max() == 1.0
    assert torch.allclose(heat, image_attention(sa.attn, sa.query_positions, sa.image_positions, sa.grid))
    with pytest.raises(HeatmapError, match="layer 5 does not exist: the LM has 2 layers"):
        span_attention(model, tok, layout, task, manifest, open_image(image_path), text, "red", layer=5)
    with eager_attention(lm):  # the same forward with eager from the start gives the same weights
        again = span_attention(model, tok, layout, task, manifest, open_image(image_path), text, "red circle", 1)
    assert torch.allclose(again.attn, sa.attn)


@pytest.mark.slow
def test_heatmap_script_writes_pngs(trained_plugin, image_path, tmp_path):
    script = load_script("heatmap")
    common = ["--plugin", str(trained_plugin), "--image", image_path, "--text", "a red circle.", "--span", "circle",
              "--layer", "-1"]
    out = script.main([*common, "--head-average", "--out", str(tmp_path / "h.png")])
    with Image.open(out) as im, Image.open(image_path) as src:
        assert im.format == "PNG" and im.size == src.size
    panels = script.main([*common, "--out", str(tmp_path / "panels.png")])
    with Image.open(panels) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # all heads + 4 heads side by side
    with pytest.raises(SystemExit) as e:  # through run_cli, as the script's __main__ runs it
        run_cli(lambda: script.main([*common[:-4], "--span", "blue", "--layer", "0"]))
    assert e.value.code == 2


def test_context_agnostic_plugin_routes_every_token_to_the_shared_group(tiny_lm_dir, tmp_path, image_path):
    """An untrained (random, non-zero) context-agnostic plugin: the task's image/text ids are remapped to the one
    shared group, which the model would refuse otherwise."""
    from mtcpeft.plugins.load import load_model
    from mtcpeft.training.build import build_task_model, task_plugin
    from mtcpeft.config import load_config
    from mtcpeft.data.dataset import open_image
    from tasks import get_task

    cfg = load_config(None, [*tiny_overrides(tiny_lm_dir, tmp_path), "adaptor.context_agnostic=true"])
    model, _, _ = build_task_model(cfg, get_task("caption"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    task_plugin(model, cfg, get_task("caption"), tmp_path / "plugin")
    loaded = load_model(tmp_path / "plugin")
    model, tok, layout, task, manifest = loaded.model, loaded.tokenizer, loaded.layout, loaded.task, loaded.manifest
    assert manifest.contexts == ["shared"]
    sa = span_attention(model, tok, layout, task, manifest, open_image(image_path), "a red circle.", "red", 0)
    assert torch.allclose(sa.attn.sum(-1), torch.ones(sa.attn.shape[:2]), atol=1e-5)
