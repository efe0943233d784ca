"""Mixed-task batch generation on a real tiny unified plugin (caption + qa, routes for vqa): a batch of caption,
VQA and QA requests generates in one ``generate`` call exactly what each request generates alone; text-only rows
take a placeholder image that nothing reads; a task plugin serves its own task only; launch/generate.py serves a
mixed request list end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from support.cli import ROOT, error_lines, run_script
from support.joint import LAYOUT, unified_plugin
from mtcpeft.config import load_config
from mtcpeft.data.packing import special_ids
from mtcpeft.data.task import offline_config
from mtcpeft.evaluation.generation import generate_texts, left_pad, stack_images
from mtcpeft.evaluation.requests import Request, RequestError, generate_requests, read_requests, request_from_words
from mtcpeft.models.vision import image_transform
from mtcpeft.plugins.load import load_model
from tasks import get_task

PASSAGES = ["the picture shows a red circle on a white ground.", "a small blue square sits in the corner of the image."]


@pytest.fixture(scope="module")
def plugins(tiny_lm_dir, tmp_path_factory):
    """(unified plugin dir, caption plugin dir, two image files)."""
    root = tmp_path_factory.mktemp("mixed")
    unified = unified_plugin(tiny_lm_dir, root)
    images = []
    for i, (shape, color) in enumerate([("ellipse", "red"), ("rectangle", "blue")]):
        im = Image.new("RGB", (64, 64), "white")
        getattr(ImageDraw.Draw(im), shape)((8 + 4 * i, 10, 50, 54 - 6 * i), fill=color)
        im.save(root / f"{shape}.png")
        images.append(str(root / f"{shape}.png"))
    return unified, root / "caption" / "plugin", images


@pytest.fixture(scope="module")
def unified(plugins):
    return load_model(plugins[0])


def mixed_requests(images) -> list[Request]:
    a, b = images
    return [Request("caption", image=a), Request("vqa", image=a, question="what shape is in the image?"),
            Request("qa", passage=PASSAGES[0], question="what color is the circle?"),
            Request("vqa", image=b, question="what color is the shape?"), Request("caption", image=b),
            Request("qa", passage=PASSAGES[1], question="where is the square?")]


def data_per_task():
    """Each task its own budget (so rows of one batch have different max_new_tokens)."""
    return {name: load_config(None, [*LAYOUT, f"data.max_target_tokens={n}"]).data
            for name, n in (("caption", 12), ("vqa", 5), ("qa", 8))}


def spy(loaded, monkeypatch) -> dict:
    """Counts the model's generate calls and records every row's ids as decoded (trailing padding dropped)."""
    seen = {"calls": 0, "ids": []}
    generate, decode = loaded.model.generate, loaded.tokenizer.decode
    pad = special_ids(loaded.tokenizer)[2]

    def counting_generate(*args, **kwargs):
        seen["calls"] += 1
        return generate(*args, **kwargs)

    def recording_decode(ids, *args, **kwargs):
        ids = list(ids.tolist())
        while ids and ids[-1] == pad:
            ids.pop()
        seen["ids"].append(ids)
        return decode(ids, *args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", counting_generate)
    monkeypatch.setattr(loaded.tokenizer, "decode", recording_decode)
    return seen


@pytest.mark.parametrize("beams,max_new_tokens,calls", [(1, None, 1), (2, 6, 1), (2, None, 3)],
                         ids=["greedy", "beams-one-budget", "beams-per-task-budgets"])
def test_a_mixed_batch_generates_what_each_request_generates_alone(plugins, unified, monkeypatch, beams,
                                                                   max_new_tokens, calls):
    requests, data = mixed_requests(plugins[2]), data_per_task()
    seen = spy(unified, monkeypatch)
    mixed = generate_requests(unified, requests, data, beams=beams, max_new_tokens=max_new_tokens)
    assert seen["calls"] == calls  # greedy: one generate for the whole batch of three tasks
    mixed_ids, seen["ids"] = seen["ids"], []
    alone = [generate_requests(unified, [r], data, beams=beams, max_new_tokens=max_new_tokens)[0] for r in requests]
    assert mixed == alone and mixed_ids == seen["ids"]
    assert all(mixed_ids) and len({tuple(ids) for ids in mixed_ids}) == len(requests)  # real, distinct generations
    # each row is cut to its own task's budget; serving a task's rows through generate_texts gives the same
    for task_name in ("caption", "vqa", "qa"):
        task = get_task(task_name)
        rows = [i for i, r in enumerate(requests) if r.task == task_name]
        layout = unified.layout_for(task, data[task_name])
        assert all(len(mixed_ids[i]) <= (max_new_tokens or layout.max_target_tokens) for i in rows)
        transform = image_transform(unified.model.encoder)
        examples = [requests[i].example() for i in rows]
        image_input = (lambda j: {"pixel_values": transform(Image.open(examples[j]["image"]).convert("RGB"))}) \
            if task.uses_images else None
        texts = generate_texts(unified.model, unified.tokenizer, layout, task, examples, image_input, beams,
                               max_new_tokens, **unified.routing(task))
        assert texts == [mixed[i] for i in rows], task_name


def test_text_rows_placeholder_image_is_never_read(plugins, unified):
    """The qa row of a mixed batch gets zeros for an image; any other placeholder gives the same logits, and its
    logits are those of the qa row alone."""
    data = load_config(None, LAYOUT).data
    caption, qa = get_task("caption"), get_task("qa")
    rows = []
    for task, example in ((caption, {"image": plugins[2][0]}), (qa, {"context": PASSAGES[0], "question": "what?"})):
        prompt = task.prompt(example, unified.tokenizer, unified.layout_for(task, data))
        routes = unified.routing(task)["routes"]
        rows.append({**prompt, "context_ids": routes[torch.tensor(prompt["context_ids"]) + 1].tolist()})
    pixels = image_transform(unified.model.encoder)(Image.open(plugins[2][0]).convert("RGB"))
    batch = left_pad(rows, special_ids(unified.tokenizer)[2])
    images = stack_images([{"pixel_values": pixels}, None], unified.model.encoder)
    assert not images["pixel_values"][1].any()
    model = unified.model
    with torch.no_grad():
        zeros = model(**batch, **images).logits
        noise = model(**batch, pixel_values=torch.stack([pixels, torch.randn_like(pixels) * 5])).logits
        alone = model(**left_pad(rows[1:], special_ids(unified.tokenizer)[2])).logits[0]
    torch.testing.assert_close(zeros, noise, atol=0, rtol=0)
    live = batch["attention_mask"][1].bool()
    torch.testing.assert_close(zeros[1][live], alone, atol=1e-5, rtol=1e-5)


def test_an_image_as_path_pil_pixels_or_features_generates_the_same(plugins, unified):
    path = plugins[2][0]
    pil = Image.open(path).convert("RGB")
    pixels = image_transform(unified.model.encoder)(pil)
    with torch.no_grad():
        features = unified.model.encoder(pixels.unsqueeze(0))[0]
    data = load_config(None, LAYOUT).data
    forms = [path, pil, pixels, features]
    # one batch holding pixels and features: the pixels are encoded to features for it
    texts = generate_requests(unified, [Request("vqa", image=im, question="what shape?") for im in forms], data,
                              max_new_tokens=6)
    assert len(set(texts)) == 1 and texts[0]


def test_a_task_plugin_serves_its_own_task_only(plugins):
    caption_dir, images = plugins[1], plugins[2]
    loaded = load_model(caption_dir)
    own = generate_requests(loaded, [Request("caption", image=p) for p in images], max_new_tokens=6)
    transform = image_transform(loaded.model.encoder)
    examples = [{"image": p} for p in images]
    legacy = generate_texts(loaded.model, loaded.tokenizer, loaded.layout, loaded.task, examples,
                            lambda i: {"pixel_values": transform(Image.open(images[i]).convert("RGB"))},
                            max_new_tokens=6)
    assert own == legacy
    with pytest.raises(RequestError, match=r"request 2 \(qa\): this is a 'caption' plugin.*'caption' requests only"):
        generate_requests(loaded, [Request("caption", image=images[0]),
                                   Request("qa", passage=PASSAGES[0], question="what?")])


def test_requests_that_cannot_be_served_are_named(plugins, unified, tmp_path):
    data = load_config(None, LAYOUT).data
    image = plugins[2][0]
    cases = [([Request("vqa", image=image)], r"request 1 \(vqa\) needs question"),
             ([Request("caption", image=image, question="why?")], r"request 1 \(caption\) reads no question"),
             ([Request("qa", question="q?", passage="p.", image=image)], r"reads no image"),
             ([Request("caption", image=str(tmp_path / "none.png"))], r"none\.png does not exist"),
             ([Request("caption", image=torch.zeros(3))], r"not shape \(3,\)"),
             ([], "no requests")]
    for requests, message in cases:
        with pytest.raises(RequestError, match=message):
            generate_requests(unified, requests, data)
    with pytest.raises(RequestError, match="unified plugin lays out each task"):
        generate_requests(unified, [Request("caption", image=image)])
    with pytest.raises(RequestError, match="'qa' in it"):
        generate_requests(unified, [Request("qa", passage="p.", question="q?")], {"caption": data})


def test_requests_from_words_and_jsonl(tmp_path):
    r = request_from_words(["vqa", "image=a.png", "question=what shape, if any?"])
    assert r == Request("vqa", image="a.png", question="what shape, if any?")
    assert request_from_words(["qa", "passage=x=y", "question=q"]).example() == {"context": "x=y", "question": "q"}
    for words, message in ((["vqa", "image"], "not FIELD=VALUE"), (["vqa", "data.seq_len=9"], "data override"),
                           (["vqa", "question=a", "question=b"], "given twice"), ([], "needs a task")):
        with pytest.raises(RequestError, match=message):
            request_from_words(words)
    f = tmp_path / "requests.jsonl"
    f.write_text('{"task": "caption", "image": "a.png"}\n\n{"task": "qa", "passage": "p.", "question": "q?"}\n')
    assert read_requests(f) == [Request("caption", image=str(tmp_path / "a.png")),
                                Request("qa", passage="p.", question="q?")]
    f.write_text('{"task": "caption"}\nnot json\n')
    with pytest.raises(RequestError, match=r"requests.jsonl:2 is not JSON"):
        read_requests(f)


def request_words(requests: list[Request]) -> list[str]:
    words = []
    for r in requests:
        given = (("image", r.image), ("question", r.question), ("passage", r.passage))
        words += ["--request", r.task, *(f"{k}={v}" for k, v in given if v)]
    return words


@pytest.mark.slow
def test_the_launch_script_serves_a_mixed_request_list(plugins, unified):
    """As a user runs it: a subprocess, one line per request in request order."""
    plugin, _, images = plugins
    requests = mixed_requests(images)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "--plugin", str(plugin), *LAYOUT,
                           "--max-new-tokens", "6", *request_words(requests)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = generate_requests(unified, requests, load_config(None, LAYOUT).data, max_new_tokens=6)
    lines = [ln.split("\t") for ln in proc.stdout.splitlines() if ln.split("\t")[0] in ("caption", "vqa", "qa")]
    assert [ln[0] for ln in lines] == [r.task for r in requests]
    assert [ln[1] for ln in lines] == [r.question or r.image for r in requests]
    assert [ln[2] for ln in lines] == want


def test_the_launch_script_reads_jsonl_keeps_single_task_usage_and_names_mistakes(plugins, unified, tmp_path, capsys):
    plugin, caption_dir, images = plugins
    requests = mixed_requests(images)
    want = generate_requests(unified, requests, load_config(None, LAYOUT).data, max_new_tokens=6)
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps({k: v for k, v in vars(r).items() if v and k != "fields"}) + "\n"
                             for r in requests))
    code, texts, _ = run_script("generate.py", ["--plugin", plugin, "--requests", jsonl, "--max-new-tokens", "6",
                                                "--", *LAYOUT], capsys)
    assert code == 0 and texts == want
    code, texts, _ = run_script("generate.py", ["--plugin", plugin, "--max-new-tokens", "6", "--batch-size", "4",
                                                *LAYOUT, *request_words(requests)], capsys)
    assert code == 0 and texts == want  # two batches (4 + 2 requests): the same texts
    # without overrides a unified plugin lays each task out as its offline config says
    qa = Request("qa", passage=PASSAGES[0], question="what color is the circle?")
    code, texts, _ = run_script("generate.py", ["--plugin", plugin, *request_words([qa])], capsys)
    assert code == 0 and texts == generate_requests(unified, [qa], {"qa": load_config(offline_config("qa")).data})
    # the single-task usage keeps working on a task plugin
    alone = generate_requests(load_model(caption_dir), [Request("caption", image=images[0])], max_new_tokens=4)
    code, texts, _ = run_script("generate.py", ["--plugin", caption_dir, "--image", images[0], "--max-new-tokens", "4"],
                                capsys)
    assert code == 0 and texts == alone
    mistakes = [
        (["--plugin", caption_dir, "--request", "qa", "passage=p.", "question=q?"],
         "request 1 (qa): this is a 'caption' plugin"),
        (["--plugin", plugin, "--image", images[0]], "serves several tasks: name each request's task"),
        (["--plugin", plugin, "--image", images[0], "--request", "caption", f"image={images[0]}"], "not both"),
        (["--plugin", plugin, "--request", "vqa", f"image={images[0]}"], "request 1 (vqa) needs question"),
        (["--plugin", caption_dir, "--image", images[0], "data.seq_len=99"], "drop --config and the data overrides"),
        (["--plugin", plugin, "--request", "caption", f"image={images[0]}", "data.seq_len=99"], "data override"),
    ]
    for argv, message in mistakes:
        code, _, err = run_script("generate.py", argv, capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)
