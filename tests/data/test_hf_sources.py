"""``data.source=hf``: tiny datasets written by ``datasets`` itself in each format (save_to_disk, parquet, JSON lines,
CSV, an imagefolder with metadata.jsonl; images as a ``datasets.Image`` column of bytes or as paths) read into the
same examples as the official-format readers give for the same data, a two-step training run per task, and the
errors for a wrong column or split."""
import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from mtcpeft.config import ConfigError, DataConfig, load_config
from mtcpeft.data.coco import read_coco_captions
from mtcpeft.data.dataset import check_images, open_image
from mtcpeft.data.hf import DatasetUnreachableError, MissingColumnError, MissingSplitError
from mtcpeft.data.image_ref import RowImage
from mtcpeft.data.sources import hf_rows_source
from mtcpeft.data.squad import read_squad
from mtcpeft.data.task import get_task
from mtcpeft.data.vqa2 import read_vqa2
from mtcpeft.training.build import build_datasets, build_task_model
from mtcpeft.training.trainer import Trainer
from support.cli import run_script
from support.runs import tiny_run_config

FIX = Path(__file__).resolve().parents[1] / "fixtures"
COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
CAPTIONS = [["a red square", "something red"], ["a green square"], ["a blue square", "blue", "a blue box"]]
IMAGE_IDS = [11, 12, 13]
PLAIN = "{image_id:012d}.jpg"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(examples):
    """Examples with each image replaced by its decoded pixels: file paths and dataset rows compare alike."""
    return [{**e, "image": open_image(e["image"]).tobytes()} for e in examples]


def _read(task, split="train", **data):
    return get_task(task).read(split, DataConfig(source="hf", **data))


# ------------------------------------------------------------------------------------------------ captions
@pytest.fixture
def coco(tmp_path):
    """Three images in a folder and COCO's official caption JSON for them: the reference reader's input."""
    (tmp_path / "img").mkdir()
    for i, c in zip(IMAGE_IDS, COLOURS):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(c))
    anns = [{"image_id": i, "caption": c} for i, caps in zip(IMAGE_IDS, CAPTIONS) for c in caps]
    doc = {"images": [{"id": i, "file_name": f"{i}.png"} for i in IMAGE_IDS], "annotations": anns}
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    return tmp_path, read_coco_captions(tmp_path / "captions.json", tmp_path / "img")


def test_caption_image_bytes_saved_to_disk(coco):
    root, expected = coco
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(c), "path": None} for c in COLOURS],
                                     "captions": CAPTIONS, "image_id": IMAGE_IDS}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(root / "saved")
    examples, note = _read("caption", "val", hf_path=str(root / "saved"))
    assert note == "" and all(type(e["image"]) is RowImage for e in examples)
    assert [e["image"] for e in examples[:3]] == [f"{root / 'saved'}[validation][{r}]" for r in (0, 0, 1)]
    assert _pixels(examples) == _pixels(expected)
    assert check_images([e["image"] for e in examples], "fail") == set()


def test_caption_path_column_in_parquet_csv_and_json_lines(coco):
    root, expected = coco
    rows = {"image_id": IMAGE_IDS, "file": [f"img/{i}.png" for i in IMAGE_IDS]}  # relative to the data file
    datasets.Dataset.from_dict({**rows, "sentences": CAPTIONS}).to_parquet(root / "caps.parquet")
    datasets.Dataset.from_dict({**rows, "sentences": CAPTIONS}).to_json(root / "caps.jsonl")
    one_per_row = {"image_id": [e["image_id"] for e in expected], "file": [f"img/{e['image_id']}.png" for e in expected],
                   "text": [e["caption"] for e in expected]}
    datasets.Dataset.from_dict(one_per_row).to_csv(root / "caps.csv", index=False)
    for name in ("caps.parquet", "caps.jsonl", "caps.csv", "c*.parquet"):  # the last: a glob
        examples, _ = _read("caption", hf_path=str(root / name), hf_columns={"image": "file"})
        assert examples == expected, name  # the same paths: nothing is copied or decoded


def test_caption_imagefolder_with_metadata(coco):
    root, expected = coco
    meta = [{"file_name": f"{i}.png", "image_id": i, "captions": caps} for i, caps in zip(IMAGE_IDS, CAPTIONS)]
    (root / "img" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    examples, _ = _read("caption", hf_path=str(root / "img"))
    assert [type(e["image"]) for e in examples] == [str] * len(expected)  # files stay paths
    assert [{**e, "image": Path(e["image"]).resolve()} for e in examples] == \
        [{**e, "image": Path(e["image"]).resolve()} for e in expected]


# ------------------------------------------------------------------------------------------------ QA (SQuAD)
def _squad_rows(path) -> dict:
    """The Hugging Face squad_v2 columns of an official file, built here independently of the readers."""
    cols = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for art in json.loads(Path(path).read_text())["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                cols["id"].append(qa["id"])
                cols["title"].append(art["title"])
                cols["context"].append(para["context"])
                cols["question"].append(qa["question"])
                cols["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [a["answer_start"] for a in qa["answers"]]})
    return cols


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet", "jsonl"])
def test_qa_squad_rows_in_each_format(tmp_path, fmt):
    ds = datasets.Dataset.from_dict(_squad_rows(FIX / "squad_v2_mini.json"))
    path = tmp_path / {"save_to_disk": "saved", "parquet": "sq.parquet", "jsonl": "sq.jsonl"}[fmt]
    if fmt == "save_to_disk":
        datasets.DatasetDict({"train": ds}).save_to_disk(path)
    else:
        getattr(ds, "to_" + ("json" if fmt == "jsonl" else fmt))(path)
    train, note = _read("qa", hf_path=str(path))
    assert train == read_squad(FIX / "squad_v2_mini.json", keep_impossible=False)[0]
    assert "1 unanswerable questions dropped" in note
    val, _ = _read("qa", "val", hf_path=str(path), hf_val_split="train")  # validation keeps unanswerable ones
    assert val == read_squad(FIX / "squad_v2_mini.json")[0]


def test_qa_columns_renamed_by_config(tmp_path):
    cols = _squad_rows(FIX / "squad_v1_mini.json")
    cols["passage"], cols["qid"] = cols.pop("context"), cols.pop("id")
    datasets.Dataset.from_dict(cols).to_parquet(tmp_path / "sq.parquet")
    examples, _ = _read("qa", hf_path=str(tmp_path / "sq.parquet"), hf_columns={"id": "qid"})
    assert examples == read_squad(FIX / "squad_v1_mini.json", keep_impossible=False)[0]


# ------------------------------------------------------------------------------------------------ VQA
@pytest.fixture
def vqa(tmp_path):
    """The VQA v2 mini fixture with one image per question's image id, and its rows in the hub's VQAv2 schema."""
    qs = json.loads((FIX / "vqa2_mini_questions.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads((FIX / "vqa2_mini_annotations.json").read_text())["annotations"]}
    (tmp_path / "img").mkdir()
    for n, q in enumerate(qs):
        Image.open(io.BytesIO(_png(COLOURS[n % 3]))).save(tmp_path / "img" / PLAIN.format(image_id=q["image_id"]))
    expected, _ = read_vqa2(FIX / "vqa2_mini_questions.json", FIX / "vqa2_mini_annotations.json", tmp_path / "img",
                            PLAIN)
    kept = [q for q in qs if q["question_id"] in anns and anns[q["question_id"]]["answers"]]
    rows = {"question_id": [q["question_id"] for q in kept], "image_id": [q["image_id"] for q in kept],
            "question": [q["question"] for q in kept],
            "answers": [anns[q["question_id"]]["answers"] for q in kept],
            "multiple_choice_answer": [anns[q["question_id"]]["multiple_choice_answer"] for q in kept],
            "file_name": [PLAIN.format(image_id=q["image_id"]) for q in kept]}
    return tmp_path, rows, expected


def test_vqa_image_column_saved_to_disk_and_parquet(vqa):
    root, rows, expected = vqa
    image = [{"bytes": (root / "img" / f).read_bytes(), "path": None} for f in rows["file_name"]]
    ds = datasets.Dataset.from_dict({**rows, "image": image}).cast_column("image", datasets.Image())
    ds.save_to_disk(root / "saved")  # one Dataset: the split "train"
    ds.to_parquet(root / "vqa.parquet")
    for path in (root / "saved", root / "vqa.parquet"):
        examples, _ = _read("vqa", hf_path=str(path))
        assert all(isinstance(e["image"], RowImage) for e in examples)
        assert _pixels(examples) == _pixels(expected), path


def test_vqa_imagefolder_and_json_lines_with_plain_answers(vqa):
    root, rows, expected = vqa
    meta = [dict(zip(rows, values)) for values in zip(*rows.values())]
    (root / "img" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    examples, _ = _read("vqa", hf_path=str(root / "img"))
    assert [{**e, "image": Path(e["image"]).resolve()} for e in examples] == \
        [{**e, "image": Path(e["image"]).resolve()} for e in expected]
    # answers as plain strings, no multiple_choice_answer: the most common answer is the target
    plain = {**rows, "answers": [[a["answer"] for a in ans] for ans in rows["answers"]],
             "file_name": [f"img/{f}" for f in rows["file_name"]]}
    del plain["multiple_choice_answer"]
    datasets.Dataset.from_dict(plain).to_json(root / "vqa.jsonl")
    examples, _ = _read("vqa", hf_path=str(root / "vqa.jsonl"))
    assert examples == expected  # the fixture's multiple_choice_answer is its most common answer


# ------------------------------------------------------------------------------------------------ any task
def test_rows_of_any_task_keep_their_columns_and_reference_images(tmp_path):
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": _png(c), "path": None} for c in COLOURS],
                                     "label": ["r", "g", "b"]}).cast_column("picture", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    examples, _ = hf_rows_source("train", DataConfig(source="hf", hf_path=str(tmp_path / "saved"),
                                                     hf_columns={"target": "label"}))
    assert [e["target"] for e in examples] == ["r", "g", "b"] and "label" not in examples[0]
    assert [open_image(e["image"]).getpixel((0, 0)) for e in examples] == COLOURS


# ------------------------------------------------------------------------------------------------ errors
def test_wrong_column_lists_the_dataset_columns(tmp_path):
    datasets.Dataset.from_dict({"picture": ["a.png"], "text": ["x"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(MissingColumnError, match=r"no column for 'image'.*columns: picture, text.*hf_columns"):
        _read("caption", hf_path=str(tmp_path / "d.parquet"))
    with pytest.raises(MissingColumnError, match=r"maps 'caption' to column 'captionz'.*columns: picture, text"):
        _read("caption", hf_path=str(tmp_path / "d.parquet"), hf_columns={"image": "picture", "caption": "captionz"})
    with pytest.raises(MissingColumnError, match=r"no column for 'context'.*columns: picture, text"):
        _read("qa", hf_path=str(tmp_path / "d.parquet"))


def test_wrong_split_lists_the_splits(tmp_path):
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["x"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(tmp_path / "saved")
    ds.to_parquet(tmp_path / "d.parquet")
    with pytest.raises(MissingSplitError, match=r"no split 'validation'; its splits: test, train; set "
                                                r"data.hf_val_split"):
        _read("caption", "val", hf_path=str(tmp_path / "saved"))
    with pytest.raises(MissingSplitError, match=r"no split 'dev'; its splits: train; set data.hf_train_split"):
        _read("caption", hf_path=str(tmp_path / "d.parquet"), hf_train_split="dev")


def test_a_hub_id_offline_and_not_cached_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetUnreachableError, match=r"data.hf_path=nobody/no-such-data: cannot reach the Hugging "
                                                      r"Face hub.*local copy"):
        _read("caption", hf_path="nobody/no-such-data")


def test_config_keys_of_the_hf_source():
    cfg = load_config(None, ["data.source=hf", "data.hf_path=org/data", "data.hf_columns={image: img}"])
    assert cfg.data.hf_columns == {"image": "img"}
    assert cfg.data.describe("val") == "data.source=hf val (data.hf_path=org/data, split 'validation')"
    cfg = load_config(None, ["data.source=hf", "data.hf_path=x", "data.hf_columns={image: img}",
                             "data.hf_columns.caption=2024"])  # one entry; a str value keeps the text as typed
    assert cfg.data.hf_columns == {"image": "img", "caption": "2024"}
    with pytest.raises(ConfigError, match="hf_path"):
        load_config(None, ["data.source=hf"])
    with pytest.raises(ConfigError, match=r"data.hf_columns. expects dict\[str, str\]"):
        load_config(None, ["data.source=hf", "data.hf_path=x", "data.hf_columns={image: [1]}"])


# ------------------------------------------------------------------------------------------------ training
def _train(lm_dir, out, task_name, *overrides):
    cfg = tiny_run_config(lm_dir, out, f"task={task_name}", "data.source=hf", "train.max_steps=2",
                          "train.batch_size=2", "data.seq_len=96", "data.hf_val_split=train", *overrides)
    task = get_task(task_name)
    torch.manual_seed(cfg.seed)
    model, tok, layout = build_task_model(cfg, task)
    data = build_datasets(cfg, task, model, tok, layout, progress=False)
    state = Trainer(cfg, model, data["train"][0], data["val"][0]).fit()
    assert state.global_step == 2
    assert all(torch.isfinite(torch.tensor(row["val_loss"])) for row in state.history if "val_loss" in row)
    return data


def test_train_caption_from_image_bytes(tiny_lm_dir, tmp_path, coco):
    root, _ = coco
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(c), "path": None} for c in COLOURS],
                                     "captions": CAPTIONS}).cast_column("image", datasets.Image())
    ds.save_to_disk(root / "saved")
    data = _train(tiny_lm_dir, tmp_path / "run", "caption", f"data.hf_path={root / 'saved'}")
    assert isinstance(data["train"][0].examples[0]["image"], RowImage)
    assert "image_features" in data["train"][0][0]  # encoded once into the feature cache, keyed by row


def test_train_qa_from_parquet(tiny_lm_dir, tmp_path):
    datasets.Dataset.from_dict(_squad_rows(FIX / "squad_v1_mini.json")).to_parquet(tmp_path / "sq.parquet")
    _train(tiny_lm_dir, tmp_path / "run", "qa", f"data.hf_path={tmp_path / 'sq.parquet'}")


def test_train_vqa_from_imagefolder_with_augmentation(tiny_lm_dir, tmp_path, vqa):
    root, rows, _ = vqa
    meta = [dict(zip(rows, values)) for values in zip(*rows.values())]
    (root / "img" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    data = _train(tiny_lm_dir, tmp_path / "run", "vqa", f"data.hf_path={root / 'img'}", "data.augment=true")
    assert data["train"][0][0]["pixel_values"].shape[0] == 3  # pixels loaded per item, not cached


def test_scripts_train_then_evaluate_on_rows_of_a_table(tiny_lm_dir, tmp_path, capsys):
    """train_task.py and evaluate.py (which reads the plugin's data config) on images held as bytes in a table."""
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(c), "path": None} for c in COLOURS],
                                     "captions": CAPTIONS}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(tmp_path / "saved")
    out = tmp_path / "run"
    code, _, err = run_script("train_task.py", ["--task", "caption", *tiny_overrides(tiny_lm_dir, out),
                                                "data.source=hf", f"data.hf_path={tmp_path / 'saved'}",
                                                "train.max_steps=2", "train.mixed_precision=no"], capsys)
    assert code == 0, err
    code, _, err = run_script("evaluate.py", ["--task", "caption", "--plugin", out / "plugin", "--limit", "4"], capsys)
    assert code == 0, err
    ev = json.loads((out / "eval_val.json").read_text())
    assert ev["data"]["kept"] == 4 and ev["samples"][0]["image"] == f"{tmp_path / 'saved'}[validation][0]"
