"""QA and VQA readers on files in the real formats (SQuAD v1.1 / v2.0 JSON, Hugging Face rows, VQA v2 questions +
annotations), every bad-input case, and the easy-VQA stand-ins."""
import copy
import json
import re
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mtcpeft.data.records import DataFormatError, need
from mtcpeft.data.easyvqa import COLORS, SHAPES, scene_facts
from mtcpeft.data.easyvqa_tasks import easyvqa_qa, easyvqa_vqa
from mtcpeft.data.squad import BadAnswerError, read_squad
from mtcpeft.data.vqa2 import read_vqa2
from mtcpeft.evaluation.metrics import vqa_accuracy

FIX = Path(__file__).resolve().parents[1] / "fixtures"
V1, V2 = FIX / "squad_v1_mini.json", FIX / "squad_v2_mini.json"
VQ, VA = FIX / "vqa2_mini_questions.json", FIX / "vqa2_mini_annotations.json"
PLAIN = "{image_id:012d}.jpg"


def _load(path):
    return json.loads(Path(path).read_text())


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def _rows(official: dict) -> list[dict]:
    """The Hugging Face squad / squad_v2 layout of an official file, converted here independently of the reader."""
    rows = []
    for art in official["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "title": art["title"], "context": para["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in qa["answers"]],
                                         "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return rows


# ---------------------------------------------------------------------------------------------- SQuAD files
def test_squad_v1_official_file():
    ex, rep = read_squad(V1)
    assert [e["id"] for e in ex] == ["5733be284776f41900661180", "5733be284776f41900661181",
                                     "571a484210f8ca1400304fbc", "571a484210f8ca1400304fbd", "56d43c5f2ccc5a1400d830aa"]
    first = ex[0]
    assert first["question"] == "How wide are the Rhine Falls?"
    assert first["answers"] == ["150 metres", "150 metres", "150 metres wide"]  # duplicates kept, as in dev sets
    assert first["answer_starts"] == [83, 83, 83] and first["impossible"] is False
    assert first["context"].startswith("The Rhine Falls lie on the High Rhine")
    assert ex[4]["answers"] == ["the Ptolemaic dynasty", "Ptolemaic dynasty"]
    for e in ex:
        for t, s in zip(e["answers"], e["answer_starts"]):
            assert e["context"][s : s + len(t)] == t
    assert (rep.questions, rep.kept, rep.impossible) == (5, 5, 0)
    assert not (rep.misplaced or rep.absent or rep.no_answers)


def test_squad_v2_impossible_kept_or_dropped():
    ex, rep = read_squad(V2)
    assert [e["impossible"] for e in ex] == [False, True, False]
    assert ex[1]["answers"] == [] and ex[1]["answer_starts"] == []  # plausible_answers are not answers
    assert ex[0]["answer_starts"] == [75, 81] and rep.impossible == 1
    ex, rep = read_squad(V2, keep_impossible=False)
    assert [e["id"] for e in ex] == ["5ad3a2b6604f3c001a3fe1a0", "5ad3a2b6604f3c001a3fe1a2"]
    assert rep.impossible_dropped == 1 and rep.kept == 2 and rep.questions == 3


@pytest.mark.parametrize("fixture", [V1, V2])
def test_hf_layouts_read_like_the_official_file(tmp_path, fixture):
    expected, _ = read_squad(fixture)
    rows = _rows(_load(fixture))
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_json(str(tmp_path / "rows.jsonl"))  # JSON lines, what to_json writes
    json_list = _write(tmp_path, "rows.json", rows)
    for source in (ds, tmp_path / "saved", str(tmp_path / "rows.jsonl"), json_list, rows):
        got, rep = read_squad(source)
        assert got == expected, source
    dd = datasets.DatasetDict({"validation": ds})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_squad(tmp_path / "dd", split="validation")[0] == expected
    with pytest.raises(DataFormatError, match=r"holds splits \['validation'\]; pass split="):
        read_squad(dd)


def test_hf_empty_answers_mean_unanswerable_unless_version_1_1():
    rows = _rows(_load(V2))
    ex, rep = read_squad(rows)
    assert ex[1]["impossible"] and rep.impossible == 1
    ex, rep = read_squad(rows, version="1.1")
    assert len(ex) == 2 and rep.no_answers == ["5ad3a2b6604f3c001a3fe1a1"]


# ------------------------------------------------------------------------------------------ SQuAD bad input
def _qa(doc, art, para, q):
    return doc["data"][art]["paragraphs"][para]["qas"][q]


@pytest.mark.parametrize("art, para, q, key, match", [
    (0, 0, 1, "question", r"question 5733be284776f41900661181: missing field 'question'"),
    (0, 0, 1, "id", r"data\[0\] paragraphs\[0\] qas\[1\]: missing field 'id'"),
    (1, 0, 0, "answers", r"question 571a484210f8ca1400304fbc: missing field 'answers'"),
])
def test_squad_missing_fields_name_field_and_record(tmp_path, art, para, q, key, match):
    doc = _load(V1)
    del _qa(doc, art, para, q)[key]
    with pytest.raises(DataFormatError, match=match):
        read_squad(_write(tmp_path, "bad.json", doc))


def test_squad_missing_answer_start_and_context(tmp_path):
    doc = _load(V1)
    del _qa(doc, 1, 0, 1)["answers"][1]["answer_start"]
    with pytest.raises(DataFormatError, match=r"question 571a484210f8ca1400304fbd answers\[1\]: missing field "
                                              r"'answer_start'"):
        read_squad(_write(tmp_path, "a.json", doc))
    doc = _load(V1)
    del doc["data"][1]["paragraphs"][1]["context"]
    with pytest.raises(DataFormatError, match=r"data\[1\] paragraphs\[1\]: missing field 'context'"):
        read_squad(_write(tmp_path, "b.json", doc))
    rows = _rows(_load(V1))
    del rows[2]["context"]
    with pytest.raises(DataFormatError, match="question 571a484210f8ca1400304fbc: missing field 'context'"):
        read_squad(rows)
    rows = _rows(_load(V1))
    rows[0]["answers"]["answer_start"].pop()
    with pytest.raises(DataFormatError, match="3 texts but 2 answer_start"):
        read_squad(rows)


def test_squad_misplaced_and_absent_answers_are_counted_skips(tmp_path):
    doc = _load(V1)
    _qa(doc, 0, 0, 0)["answers"][2]["answer_start"] += 1  # "150 metres wide" now one character off
    _qa(doc, 0, 0, 1)["answers"][0]["text"] = "Zurich"  # not in the passage: the question's only answer
    path = _write(tmp_path, "bad.json", doc)
    ex, rep = read_squad(path)
    assert ex[0]["answers"] == ["150 metres", "150 metres"]  # the good answers of the question stay
    assert "5733be284776f41900661181" not in [e["id"] for e in ex]
    assert rep.misplaced == ["5733be284776f41900661180"] and rep.absent == ["5733be284776f41900661181"]
    assert rep.no_answers == ["5733be284776f41900661181"] and (rep.questions, rep.kept) == (5, 4)
    assert "4 of 5 questions kept" in rep.summary("train")
    with pytest.raises(BadAnswerError, match="answer '150 metres wide' is not at answer_start 84"):
        read_squad(path, on_bad="fail")


def test_squad_empty_answers_on_answerable_question_skipped(tmp_path):
    doc = _load(V1)
    _qa(doc, 1, 0, 0)["answers"] = []
    ex, rep = read_squad(_write(tmp_path, "bad.json", doc))
    assert rep.no_answers == ["571a484210f8ca1400304fbc"] and len(ex) == 4
    with pytest.raises(BadAnswerError, match="answerable question has no answers"):
        read_squad(_write(tmp_path, "bad.json", doc), on_bad="fail")


def test_squad_malformed_json_duplicate_ids_and_missing_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text(V1.read_text()[:-20])
    with pytest.raises(DataFormatError) as e:
        read_squad(bad)
    assert str(bad) in str(e.value) and "not valid JSON" in str(e.value) and "\n" not in str(e.value)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(_rows(_load(V1))[0]) + "\n{\"id\": \n")
    with pytest.raises(DataFormatError, match=r"broken.jsonl is not valid JSON lines .* on line 2"):
        read_squad(lines)
    doc = _load(V1)
    _qa(doc, 1, 0, 1)["id"] = _qa(doc, 0, 0, 0)["id"]
    with pytest.raises(DataFormatError, match="appears twice"):
        read_squad(_write(tmp_path, "dup.json", doc))
    with pytest.raises(DataFormatError, match="does not exist"):
        read_squad(tmp_path / "nope.json")
    (tmp_path / "not_saved").mkdir()
    with pytest.raises(DataFormatError, match="not one written by datasets' save_to_disk"):
        read_squad(tmp_path / "not_saved")


def test_squad_json_lines_of_one_row(tmp_path):
    row = _rows(_load(V1))[1]
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps(row) + "\n")
    assert read_squad(p)[0] == read_squad(V1)[0][1:2]


# ------------------------------------------------------------------------------------------------ VQA v2
def _images(root: Path, names):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8), (10, 200, 30)).save(root / n)


def test_vqa2_questions_annotations_and_coco_images(tmp_path):
    _images(tmp_path, ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"])
    ex, rep = read_vqa2(VQ, VA, tmp_path)
    assert [e["question_id"] for e in ex] == [42000, 42001, 73000]
    assert ex[0]["image"] == str(tmp_path / "COCO_val2014_000000000042.jpg") and ex[0]["image_id"] == 42
    assert ex[0]["question"] == "What color is the umbrella?" and ex[0]["answer"] == "red"
    assert ex[0]["answers"] == ["red"] * 7 + ["red and white", "pink", "red"]
    assert ex[2]["image"] == str(tmp_path / "COCO_val2014_000000000073.jpg")
    assert (rep.questions, rep.kept, rep.unannotated, rep.no_answers) == (3, 3, [], [])
    # the human answers feed the VQA metric directly: "Two" -> "2", given by 8 of 10 humans ("two" is not
    # normalised on the reference side, as in the official script)
    assert vqa_accuracy({e["question_id"]: "Two" for e in ex}, {e["question_id"]: e["answers"] for e in ex}
                        )["per_example"][42001] == 1.0


def test_vqa2_plain_and_custom_image_names(tmp_path):
    _images(tmp_path / "plain", ["000000000042.jpg", "000000000073.jpg"])
    for pattern in ("auto", None):
        ex, _ = read_vqa2(VQ, VA, tmp_path / "plain", pattern)
        assert ex[1]["image"] == str(tmp_path / "plain" / "000000000042.jpg")
    ex, _ = read_vqa2(VQ, VA, tmp_path, image_pattern="img_{image_id}.png")
    assert ex[2]["image"] == str(tmp_path / "img_73.png")
    ex, _ = read_vqa2(VQ, VA, tmp_path, image_pattern="COCO_{subtype}_{image_id:012d}.jpg", data_subtype="train2014")
    assert ex[0]["image"] == str(tmp_path / "COCO_train2014_000000000042.jpg")
    with pytest.raises(DataFormatError, match=r"no image for image_id 42: tried .*COCO_val2014_000000000042.jpg, "
                                              r".*/000000000042.jpg"):
        read_vqa2(VQ, VA, tmp_path / "empty")


def test_vqa2_test_split_without_annotations(tmp_path):
    ex, rep = read_vqa2(VQ, None, tmp_path, image_pattern=PLAIN)
    assert [(e["answers"], e["answer"]) for e in ex] == [([], None)] * 3 and rep.kept == 3



def test_vqa2_unannotated_and_empty_answers_are_counted_skips(tmp_path):
    anns = _load(VA)
    del anns["annotations"][1]  # question 42001 loses its annotation
    anns["annotations"][1]["answers"] = []  # question 73000 has no answers
    path = _write(tmp_path, "anns.json", anns)
    ex, rep = read_vqa2(VQ, path, tmp_path, image_pattern=PLAIN)
    assert [e["question_id"] for e in ex] == [42000]
    assert rep.unannotated == [42001] and rep.no_answers == [73000] and "1 of 3 questions kept" in rep.summary("val")
    with pytest.raises(DataFormatError, match="question_id 42001: no annotation"):
        read_vqa2(VQ, path, tmp_path, image_pattern=PLAIN, on_bad="fail")


@pytest.mark.parametrize("which, index, key, match", [
    ("q", 1, "question", r"questions.json question_id 42001: missing field 'question'"),
    ("q", 2, "image_id", r"question_id 73000: missing field 'image_id'"),
    ("q", 0, "question_id", r"questions\[0\]: missing field 'question_id'"),
    ("a", 2, "multiple_choice_answer", r"anns.json question_id 73000: missing field 'multiple_choice_answer'"),
    ("a", 0, "answers", r"question_id 42000: missing field 'answers'"),
])
def test_vqa2_missing_fields(tmp_path, which, index, key, match):
    qs, anns = _load(VQ), _load(VA)
    del (qs["questions"] if which == "q" else anns["annotations"])[index][key]
    with pytest.raises(DataFormatError, match=match):
        read_vqa2(_write(tmp_path, "questions.json", qs), _write(tmp_path, "anns.json", anns), tmp_path,
                  image_pattern=PLAIN)


def test_vqa2_malformed_json_and_mismatched_image(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(VQ.read_text()[:50])
    with pytest.raises(DataFormatError, match=re.escape(str(bad)) + " is not valid JSON"):
        read_vqa2(bad, VA, tmp_path)
    anns = _load(VA)
    anns["annotations"][0]["image_id"] = 7
    with pytest.raises(DataFormatError, match="image_id 7 differs from the question's 42"):
        read_vqa2(VQ, _write(tmp_path, "a.json", anns), tmp_path, image_pattern=PLAIN)


# ------------------------------------------------------------------------------------- easy-VQA stand-ins
def test_easyvqa_qa_answers_at_their_offsets_in_distractor_free_passages():
    ex = easyvqa_qa("val", limit=400)
    facts = scene_facts("test")
    yes_no = 0
    for e in ex:
        (a,), (s,) = e["answers"], e["answer_starts"]
        image_id = int(e["id"].split("-")[2])
        if a in ("yes", "no"):
            yes_no += 1
            assert s == -1  # generative: yes/no is not in the passage
        else:
            assert e["context"][s : s + len(a)] == a
            assert a in (facts[image_id]["color"], facts[image_id]["shape"])
        words = set(re.findall(r"[a-z]+", e["context"].lower()))
        assert words & COLORS == {facts[image_id]["color"]} and words & SHAPES == {facts[image_id]["shape"]}
    assert 0 < yes_no < len(ex)
    assert len({e["context"].split(" ")[0] for e in ex}) > 1  # several phrasings


def test_easyvqa_splits_disjoint_caps_and_deterministic():
    train, val = easyvqa_vqa("train", limit=3000), easyvqa_vqa("val")
    assert not {e["image"] for e in train} & {e["image"] for e in val}
    assert not {e["question_id"] for e in train} & {e["question_id"] for e in val}
    assert all(e["answers"] == [e["answer"]] * 10 for e in val[:50])
    assert vqa_accuracy({e["question_id"]: e["answer"] for e in val[:50]},
                        {e["question_id"]: e["answers"] for e in val[:50]})["accuracy"] == 1.0
    capped = easyvqa_qa("val", questions_per_image=2)
    per_image = {}
    for e in capped:
        per_image[e["id"].rsplit("-", 1)[0]] = per_image.get(e["id"].rsplit("-", 1)[0], 0) + 1
    assert max(per_image.values()) == 2 and len(per_image) == len(scene_facts("test"))
    assert len(easyvqa_qa("val", limit=7)) == 7
    first = copy.deepcopy(easyvqa_qa("val", limit=300))
    scene_facts.cache_clear()  # re-read the package files
    assert easyvqa_qa("val", limit=300) == first
    with pytest.raises(ValueError, match="splits"):
        easyvqa_qa("test")


@pytest.mark.parametrize("record, kind, message", [
    ({}, int, "missing field 'id'"),
    ([1], int, "missing field 'id'"),
    ({"id": "7"}, int, "field 'id' should be int, got str"),
    ({"id": True}, (str, int), "field 'id' should be str or int, got bool"),  # JSON true is not an id
])
def test_need_names_the_record_and_field(record, kind, message):
    with pytest.raises(DataFormatError, match=f"^f.json qas\\[3\\]: {message}$"):
        need(record, "id", "f.json qas[3]", kind)
    assert need({"id": 7}, "id", "f.json", (str, int)) == 7 and need({"id": None}, "id", "f.json") is None
