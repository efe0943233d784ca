"""Rows of a Hugging Face ``datasets`` split -> the example dicts of each task's own format reader, so that a task
reads COCO, SQuAD or VQA v2 from the hub (or a local parquet / imagefolder copy) exactly as from the official
files:

* captions -> ``{"image_id", "image", "caption"}``, one example per caption (:mod:`.coco`);
* QA -> SQuAD's examples, through :func:`.squad.read_squad` and its answer checks;
* VQA -> ``{"question_id", "image_id", "image", "question", "answers", "answer"}`` (:mod:`.vqa2`);
* any other task -> one example per row, keyed by field (the column's own name unless ``data.hf_columns`` maps
  it), with the ``image`` field (or a ``datasets.Image`` column) as an image reference.

Each ``*_COLUMNS`` table lists, per field, the columns of the common hub schemas that may hold it, first found
wins; ``data.hf_columns`` overrides. Missing ids fall back to the row number.
"""
from __future__ import annotations

from collections import Counter

from .hf import columns, image_refs
from .records import DataFormatError
from .squad import QAReport, read_squad

IMAGE = ("image", "img", "image_path", "file_name", "filepath", "filename")
CAPTION_COLUMNS = {"image": IMAGE, "caption": ("caption", "captions", "sentences", "sentences_raw", "text", "raw"),
                   "image_id": ("image_id", "cocoid", "imgid")}
QA_COLUMNS = {"id": ("id", "question_id"), "context": ("context", "passage"), "question": ("question",),
              "answers": ("answers",)}
VQA_COLUMNS = {"image": IMAGE, "question": ("question",), "answers": ("answers",),
               "answer": ("multiple_choice_answer", "answer"), "question_id": ("question_id", "id"),
               "image_id": ("image_id",)}


def _texts(value, where: str) -> list[str]:
    """A cell of captions or answers as strings: a string, a list of strings, or records with ``raw`` (Karpathy
    sentences) or ``answer`` (VQA v2 answers); a dict of lists (``{"raw": [...]}``) too."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        for k in ("raw", "text", "answer"):
            if isinstance(value.get(k), list):
                return _texts(value[k], where)
    if isinstance(value, list):
        out = []
        for v in value:
            v = v.get("raw", v.get("answer", v.get("text"))) if isinstance(v, dict) else v
            if not isinstance(v, str):
                break
            out.append(v)
        else:
            return out
    raise DataFormatError(f"{where}: expected text, a list of texts or of records with 'raw' / 'answer', got "
                          f"{type(value).__name__} {str(value)[:80]}")


def _ids(ds, cols: dict, field: str) -> list:
    return list(ds[cols[field]]) if field in cols else list(range(len(ds)))


def hf_captions(ds, mapping: dict | None, key: str, base: str | None) -> list[dict]:
    cols = columns(ds, CAPTION_COLUMNS, ("image", "caption"), mapping)
    images, ids = image_refs(ds, cols["image"], key, base), _ids(ds, cols, "image_id")
    out = []
    for row, (image, image_id, caps) in enumerate(zip(images, ids, ds[cols["caption"]])):
        out += [{"image_id": image_id, "image": image, "caption": c}
                for c in _texts(caps, f"{key} row {row} column {cols['caption']!r}")]
    return out


def hf_qa(ds, mapping: dict | None, key: str, keep_impossible: bool) -> tuple[list[dict], QAReport]:
    """SQuAD-schema rows (``answers: {"text": [...], "answer_start": [...]}``) read by :func:`read_squad`."""
    cols = columns(ds, QA_COLUMNS, ("context", "question", "answers"), mapping)
    if len(set(cols.values())) < len(cols):
        raise DataFormatError(f"data.hf_columns maps several fields to one column: {cols}")
    ds = ds.select_columns(list(cols.values())).rename_columns({c: f for f, c in cols.items() if c != f})
    if "id" not in cols:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    return read_squad(ds, keep_impossible=keep_impossible)


def hf_vqa(ds, mapping: dict | None, key: str, base: str | None) -> list[dict]:
    cols = columns(ds, VQA_COLUMNS, ("image", "question"), mapping)
    images = image_refs(ds, cols["image"], key, base)
    qids, image_ids = _ids(ds, cols, "question_id"), _ids(ds, cols, "image_id")
    n = len(ds)
    answers = ds[cols["answers"]] if "answers" in cols else [None] * n
    chosen = ds[cols["answer"]] if "answer" in cols else [None] * n
    out = []
    for row, (image, qid, image_id, question, ans, answer) in enumerate(
            zip(images, qids, image_ids, ds[cols["question"]], answers, chosen)):
        where = f"{key} row {row}"
        ans = _texts(ans, f"{where} column {cols.get('answers')!r}") if ans is not None else []
        if answer is not None and not isinstance(answer, str):
            raise DataFormatError(f"{where} column {cols['answer']!r}: expected one answer (text), got "
                                  f"{type(answer).__name__}")
        if answer is None and ans:
            answer = Counter(ans).most_common(1)[0][0]  # VQA v2's multiple_choice_answer: the most common one
        out.append({"question_id": qid, "image_id": image_id, "image": image, "question": question,
                    "answers": ans or ([answer] if answer else []), "answer": answer})
    return out


def hf_rows(ds, mapping: dict | None, key: str, base: str | None) -> list[dict]:
    """One example per row for any task: every column under its field name (``data.hf_columns`` renames), the
    ``image`` field (else the first ``datasets.Image`` column) as an image reference."""
    import datasets

    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    wanted = {"image": ("image", *images)}
    cols = columns(ds, wanted, (), mapping)
    field = {c: c for c in ds.column_names} | {c: f for f, c in cols.items()}
    image = cols.get("image")
    rows = ds.remove_columns([image]) if image else ds
    out = [{field[c]: v for c, v in row.items()} for row in rows]
    if image:
        for example, ref in zip(out, image_refs(ds, image, key, base)):
            example["image"] = ref
    return out
