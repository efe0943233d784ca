"""Captioning: the paper's sequence layout, both COCO formats, easy-VQA captions, bad input."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from mtcpeft.data.coco import read_coco_captions, read_karpathy
from mtcpeft.data.records import DataFormatError
from mtcpeft.data.dataset import BadImageError, check_images
from mtcpeft.data.easyvqa import easyvqa_captions
from tasks import get_task
from mtcpeft.core.losses import IGNORE
from mtcpeft.data.packing import SequenceLayout
from support.tokenizer import make_tokenizer

FIX = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("T, seq_len, max_cap", [(64, 128, 63), (49, 128, 63), (49, 64, 14)])  # Swin V2, EffNet
def test_sequence_layout_positions_contexts_and_labels(tok, T, seq_len, max_cap):
    task = get_task("caption")
    layout = SequenceLayout(T, seq_len, max_cap)
    cap = "a man with a red helmet on a small moped on a dirt road."
    text = tok(cap, add_special_tokens=False).input_ids
    enc = task.encode({"image_id": 1, "caption": cap}, tok, layout)
    n = min(len(text), max_cap - 1)
    assert enc["truncated"] == (len(text) > max_cap - 1)
    for k in ("input_ids", "context_ids", "labels", "attention_mask", "image_mask"):
        assert len(enc[k]) == seq_len, k
    img, txt = task.vocab.id("image"), task.vocab.id("text")
    ids, ctx, lab = enc["input_ids"], enc["context_ids"], enc["labels"]
    assert ids[0] == tok.bos_token_id and ctx[0] == txt and lab[0] == IGNORE  # [BOS]
    assert ctx[1 : 1 + T] == [img] * T and enc["image_mask"][1 : 1 + T] == [True] * T  # image tokens
    assert sum(enc["image_mask"]) == T and lab[1 : 1 + T] == [IGNORE] * T
    start = 1 + T
    assert ids[start : start + n] == text[:n] and ids[start + n] == tok.eos_token_id  # caption, [EOS]
    assert lab[start : start + n + 1] == ids[start : start + n + 1]  # loss on caption + EOS only
    assert ctx[start : start + n + 1] == [txt] * (n + 1)
    assert ctx[start + n + 1 :] == [-1] * (seq_len - start - n - 1)  # padding: no adaptor, no loss, masked
    assert lab[start + n + 1 :] == [IGNORE] * (seq_len - start - n - 1)
    assert enc["attention_mask"] == [1] * (start + n + 1) + [0] * (seq_len - start - n - 1)
    if (T, seq_len) == (64, 128):  # the paper: loss only on the last 64 of 128 positions
        assert all(label == IGNORE for label in lab[:64]) and any(label != IGNORE for label in lab[64:])


def test_layout_rejects_budget_overflow():
    with pytest.raises(ValueError, match="seq_len 128 cannot hold"):
        SequenceLayout(64, 128, 64)


def test_empty_caption_is_refused(tok):
    with pytest.raises(ValueError, match="empty caption target"):
        get_task("caption").encode({"image_id": 3, "caption": "   "}, tok, SequenceLayout(4, 16, 8))


def _write_images(root: Path, names, size=(32, 32)):
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 30, 30)).save(p)


def test_official_coco_json_one_example_per_caption(tmp_path):
    ex = read_coco_captions(FIX / "captions_mini.json", tmp_path)
    assert len(ex) == 5  # one per caption annotation; the blank one is dropped later by the encoder
    assert ex[0] == {"image_id": 9, "image": str(tmp_path / "000000000009.jpg"),
                     "caption": "Closeup of bins of food that include broccoli and bread."}
    assert [e["image_id"] for e in ex] == [9, 9, 25, 30, 30]


def test_karpathy_split_train_includes_restval(tmp_path):
    train = read_karpathy(FIX / "dataset_coco_mini.json", tmp_path, "train")
    assert [e["image_id"] for e in train] == [522418, 318556, 318556]
    assert train[0]["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000522418.jpg")
    assert [e["caption"] for e in read_karpathy(FIX / "dataset_coco_mini.json", tmp_path, "test")][0].startswith("A man")
    assert len(read_karpathy(FIX / "dataset_coco_mini.json", tmp_path, "val")) == 1
    with pytest.raises(DataFormatError, match="unknown Karpathy split"):
        read_karpathy(FIX / "dataset_coco_mini.json", tmp_path, "dev")


def test_malformed_annotation_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_coco_captions(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(DataFormatError, match=r"annotations\[0\]: missing field 'caption'"):
        read_coco_captions(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(DataFormatError, match="image_id 7 is not listed"):
        read_coco_captions(bad, tmp_path)
    with pytest.raises(DataFormatError, match="does not exist"):
        read_coco_captions(tmp_path / "nope.json", tmp_path)


def test_missing_and_corrupt_images_are_counted_or_fail(tmp_path):
    _write_images(tmp_path, ["ok.png"])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = [str(tmp_path / n) for n in ("ok.png", "corrupt.png", "missing.png")]
    assert check_images(paths, "skip", progress=False) == {paths[1], paths[2]}
    with pytest.raises(BadImageError, match="data.on_bad_image=skip"):
        check_images(paths, "fail", progress=False)


def test_task_reads_each_source(tmp_path):
    task = get_task("caption")
    data = SimpleNamespace(source="karpathy", karpathy_json=str(FIX / "dataset_coco_mini.json"), images=str(tmp_path))
    assert len(task.examples("train", data)) == 3
    data = SimpleNamespace(source="coco", annotations=str(FIX / "captions_mini.json"), val_annotations=None,
                           images=str(tmp_path))
    assert len(task.examples("train", data)) == 5
    with pytest.raises(ValueError, match="data.val_annotations is not set"):
        task.examples("val", data)


def test_easyvqa_captions_agree_with_its_answers():
    train, val = easyvqa_captions("train"), easyvqa_captions("val")
    assert len(train) > 6000 and len(val) > 1500
    assert not {e["image"] for e in train} & {e["image"] for e in val}  # a fixed, disjoint split
    e = train[0]
    assert e["caption"] in e["references"] and Path(e["image"]).is_file()
