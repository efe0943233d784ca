"""VQA v2 (Goyal et al., 2017, arXiv 1612.00837) in its released format, read into example dicts

    {"question_id", "image_id", "image": path, "question", "answers": [10 human answers], "answer"}

* questions JSON (``v2_OpenEnded_mscoco_val2014_questions.json``): ``{"data_subtype": "val2014", "questions":
  [{"image_id", "question", "question_id"}]}``;
* annotations JSON (``v2_mscoco_val2014_annotations.json``): ``{"annotations": [{"question_id", "image_id",
  "answers": [{"answer", "answer_confidence", "answer_id"}] x 10, "multiple_choice_answer", "answer_type",
  "question_type"}]}``; ``answer`` is ``multiple_choice_answer`` (the most common human answer);
* images: COCO 2014 files named ``COCO_<subtype>_<12-digit id>.jpg`` (``COCO_val2014_000000000042.jpg``) or
  plain ``<12-digit id>.jpg``; ``image_pattern`` chooses (a format string with ``{image_id}`` and
  ``{subtype}``), "auto" tries both on the first questions' images.

The test split has no annotations: pass ``annotations=None`` and the examples get ``answers=[]`` and
``answer=None``, which is enough for prediction. Questions without an annotation, or whose annotation has no
answers, are dropped and counted in a :class:`VQAReport` (``on_bad="fail"`` raises). Format errors raise
:class:`DataFormatError` naming the file and the question id.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .records import DataFormatError, load_json, need

COCO_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"
PLAIN_PATTERN = "{image_id:012d}.jpg"


@dataclass
class VQAReport:
    """What reading VQA v2 dropped. Lists hold question ids."""

    questions: int = 0
    kept: int = 0
    unannotated: list = field(default_factory=list)  # questions without an annotation
    no_answers: list = field(default_factory=list)  # annotations with an empty answer list
    unmatched_annotations: int = 0  # annotations of questions not in the questions file (ignored)

    def summary(self, split: str) -> str:
        return (f"{split}: {self.kept:,} of {self.questions:,} questions kept; {len(self.unannotated)} without an "
                f"annotation and {len(self.no_answers)} without answers skipped; {self.unmatched_annotations} "
                "annotations of unknown questions ignored")


def _image_path(root: Path, pattern: str, image_id: int, subtype: str | None) -> Path:
    if ("{subtype" in pattern or "{split" in pattern) and not subtype:
        raise DataFormatError(f"image_pattern {pattern!r} needs the data subtype (e.g. 'val2014'): the questions file "
                              "has no 'data_subtype'; pass data_subtype=")
    try:  # {split}: what older configs called the subtype
        return root / pattern.format(image_id=image_id, subtype=subtype, split=subtype)
    except (KeyError, IndexError, ValueError) as e:
        raise DataFormatError(f"image_pattern {pattern!r} cannot be filled ({e!r}); use the fields {{image_id}} "
                              "and {subtype}, e.g. 'COCO_{subtype}_{image_id:012d}.jpg'") from None


def _pick_pattern(root: Path, pattern: str, image_ids: list[int], subtype: str | None) -> str:
    """``pattern``, or for "auto" the naming under which one of ``image_ids`` (the first questions' images) exists:
    a few missing images are skipped and counted later, not mistaken for a wrong naming."""
    if pattern != "auto":
        return pattern
    cands = [c for c in (COCO_PATTERN, PLAIN_PATTERN) if subtype or "{subtype" not in c]
    for image_id in image_ids:
        for cand in cands:
            if _image_path(root, cand, image_id, subtype).is_file():
                return cand
    tried = ", ".join(str(_image_path(root, c, image_ids[0], subtype)) for c in cands)
    others = f" (nor for the next {len(image_ids) - 1} images)" if len(image_ids) > 1 else ""
    raise DataFormatError(f"no image for image_id {image_ids[0]}: tried {tried}{others}; check the image folder or "
                          "set image_pattern (fields {image_id} and {subtype})")


def read_vqa2(questions: str | os.PathLike, annotations: str | os.PathLike | None, image_root: str | os.PathLike,
              image_pattern: str | None = "auto", *, data_subtype: str | None = None,
              on_bad: str = "skip") -> tuple[list[dict], VQAReport]:
    """VQA v2 questions (+ annotations, unless None: the test split) -> (examples in question-file order, report).
    ``image_pattern`` None or "auto" tries the COCO and the plain naming."""
    image_pattern = image_pattern or "auto"
    if on_bad not in ("skip", "fail"):
        raise ValueError(f"on_bad must be 'skip' or 'fail', not {on_bad!r}")
    qdata, qwhere = load_json(questions), str(questions)
    subtype = data_subtype or (qdata.get("data_subtype") if isinstance(qdata, dict) else None)
    qs = need(qdata, "questions", qwhere, list)
    anns = None
    if annotations is not None:
        adata, awhere = load_json(annotations), str(annotations)
        anns = {}
        for i, ann in enumerate(need(adata, "annotations", awhere, list)):
            qid = need(ann, "question_id", f"{awhere} annotations[{i}]", int)
            if qid in anns:
                raise DataFormatError(f"{awhere}: question_id {qid} is annotated twice")
            anns[qid] = ann
    root, report, out, seen = Path(image_root), VQAReport(), [], set()
    for i, q in enumerate(qs):
        qid = need(q, "question_id", f"{qwhere} questions[{i}]", int)
        where = f"{qwhere} question_id {qid}"
        if qid in seen:
            raise DataFormatError(f"{where}: the question id appears twice")
        seen.add(qid)
        image_id = need(q, "image_id", where, int)
        question = need(q, "question", where, str)
        report.questions += 1
        ex = {"question_id": qid, "image_id": image_id, "image": None, "question": question, "answers": [],
              "answer": None}
        if anns is not None:
            ann = anns.get(qid)
            if ann is None:
                if on_bad == "fail":
                    raise DataFormatError(f"{where}: no annotation in {annotations}; use the annotation file of the "
                                          "same split, or on_bad='skip'")
                report.unannotated.append(qid)
                continue
            awhere = f"{annotations} question_id {qid}"
            if need(ann, "image_id", awhere, int) != image_id:
                raise DataFormatError(f"{awhere}: image_id {ann['image_id']} differs from the question's {image_id}")
            answers = [need(a, "answer", f"{awhere} answers[{j}]", str)
                       for j, a in enumerate(need(ann, "answers", awhere, list))]
            mc = need(ann, "multiple_choice_answer", awhere, str)
            if not answers:
                if on_bad == "fail":
                    raise DataFormatError(f"{awhere}: empty answer list; fix the record or use on_bad='skip'")
                report.no_answers.append(qid)
                continue
            ex["answers"], ex["answer"] = answers, mc
        out.append(ex)
        report.kept += 1
    if out:
        pattern = _pick_pattern(root, image_pattern, [e["image_id"] for e in out[:100]], subtype)
        for ex in out:
            ex["image"] = str(_image_path(root, pattern, ex["image_id"], subtype))
    if anns is not None:
        report.unmatched_annotations = len(set(anns) - seen)
    return out, report
