"""SQuAD-style extractive QA data, in its two real layouts, read into example dicts

    {"id", "context", "question", "answers": [str, ...], "answer_starts": [int, ...], "impossible": bool}

* Official JSON (SQuAD v1.1: Rajpurkar et al., 2016, arXiv 1606.05250; v2.0: 2018, arXiv 1806.03822):
  ``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
  "answer_start"}], "is_impossible"?, "plausible_answers"?}]}]}]}``; ``answer_start`` is a character offset into
  the context.
* Hugging Face ``datasets`` rows (the ``squad`` / ``squad_v2`` layout): ``id``, ``title``, ``context``,
  ``question``, ``answers: {"text": [...], "answer_start": [...]}``, given as a ``datasets.Dataset`` (or a
  ``DatasetDict`` with ``split``), a folder written by ``save_to_disk``, or a JSON / JSON-lines file of rows.
  These rows have no ``is_impossible``: an empty answer list marks an unanswerable question (squad_v2), unless
  ``version="1.1"`` says there are none.

Format errors (missing or mistyped fields, duplicate ids, malformed JSON) raise :class:`DataFormatError` naming
the file and record. Bad answers are dropped and counted in a :class:`QAReport` (``on_bad="fail"`` raises
:class:`BadAnswerError` instead): an answer whose text is not at its ``answer_start`` in the context, or not in
the context at all; a question left with no answer that is not marked unanswerable is dropped. Unanswerable
(v2.0) questions are kept with empty answers unless ``keep_impossible=False``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .records import DataFormatError, need


class BadAnswerError(DataFormatError):
    """An answer does not match its passage (and ``on_bad`` is "fail")."""


@dataclass
class QAReport:
    """What reading a QA file dropped, so nothing is lost silently. Lists hold question ids."""

    questions: int = 0
    kept: int = 0
    impossible: int = 0  # unanswerable questions kept
    impossible_dropped: int = 0
    misplaced: list[str] = field(default_factory=list)  # an answer's text is in the context, not at answer_start
    absent: list[str] = field(default_factory=list)  # an answer's text is nowhere in the context
    no_answers: list[str] = field(default_factory=list)  # answerable question without any (valid) answer

    def summary(self, split: str) -> str:
        return (f"{split}: {self.kept:,} of {self.questions:,} questions kept ({self.impossible:,} unanswerable); "
                f"answers dropped: {len(self.misplaced)} not at answer_start, {len(self.absent)} not in the passage; "
                f"{len(self.no_answers)} questions without a usable answer skipped, "
                f"{self.impossible_dropped} unanswerable questions dropped")


class _Builder:
    """Checks answers against passages and collects examples + the report."""

    def __init__(self, keep_impossible: bool, on_bad: str):
        if on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad must be 'skip' or 'fail', not {on_bad!r}")
        self.keep_impossible, self.on_bad = keep_impossible, on_bad
        self.report, self.examples, self.seen = QAReport(), [], set()

    def _bad(self, kind: list, qid: str, message: str):
        if self.on_bad == "fail":
            raise BadAnswerError(f"{message}; fix the record or read with on_bad='skip' to drop such answers")
        kind.append(qid)

    def add(self, qid: str, context: str, question: str, answers: list[tuple[str, int]], impossible: bool,
            where: str):
        if qid in self.seen:
            raise DataFormatError(f"{where}: question id {qid!r} appears twice; ids must be unique")
        self.seen.add(qid)
        self.report.questions += 1
        if impossible:
            if not self.keep_impossible:
                self.report.impossible_dropped += 1
                return
            answers = []
        texts, starts = [], []
        for text, start in answers:
            if text and start >= 0 and context[start : start + len(text)] == text:
                texts.append(text)
                starts.append(start)
            elif not text:
                self._bad(self.report.absent, qid, f"{where}: an answer has empty text")
            elif text in context:
                self._bad(self.report.misplaced, qid,
                          f"{where}: answer {text!r} is not at answer_start {start} of the context")
            else:
                self._bad(self.report.absent, qid, f"{where}: answer {text!r} does not occur in the context")
        if not texts and not impossible:
            if not answers:  # the record itself has no answer (a failed one was reported above)
                self._bad(self.report.no_answers, qid, f"{where}: answerable question has no answers")
            else:
                self.report.no_answers.append(qid)
            return
        self.report.kept += 1
        self.report.impossible += impossible
        self.examples.append({"id": qid, "context": context, "question": question, "answers": texts,
                              "answer_starts": starts, "impossible": impossible})


def _read_official(data: dict, where: str, b: _Builder) -> None:
    for i, article in enumerate(need(data, "data", where, list)):
        wa = f"{where} data[{i}]"
        for j, para in enumerate(need(article, "paragraphs", wa, list)):
            wp = f"{wa} paragraphs[{j}]"
            context = need(para, "context", wp, str)
            for k, qa in enumerate(need(para, "qas", wp, list)):
                qid = str(need(qa, "id", f"{wp} qas[{k}]", (str, int)))
                wq = f"{where} question {qid}"
                question = need(qa, "question", wq, str)
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible and "answers" not in qa else need(qa, "answers", wq, list)
                pairs = [(need(a, "text", f"{wq} answers[{n}]", str),
                          need(a, "answer_start", f"{wq} answers[{n}]", int)) for n, a in enumerate(answers)]
                b.add(qid, context, question, pairs, impossible, wq)


def _read_rows(rows, where: str, b: _Builder, empty_is_impossible: bool) -> None:
    for r, row in enumerate(rows):
        qid = str(need(row, "id", f"{where} row {r}", (str, int)))
        wq = f"{where} question {qid}"
        context = need(row, "context", wq, str)
        question = need(row, "question", wq, str)
        answers = need(row, "answers", wq, dict)
        texts = need(answers, "text", f"{wq} answers", list)
        starts = need(answers, "answer_start", f"{wq} answers", list)
        if len(texts) != len(starts):
            raise DataFormatError(f"{wq}: answers has {len(texts)} texts but {len(starts)} answer_start values")
        for n, (t, s) in enumerate(zip(texts, starts)):
            if not isinstance(t, str) or not isinstance(s, int) or isinstance(s, bool):
                raise DataFormatError(f"{wq}: answers[{n}] should be text (str) at answer_start (int), got "
                                      f"{type(t).__name__} at {type(s).__name__}")
        impossible = bool(row.get("is_impossible", empty_is_impossible and not texts))
        b.add(qid, context, question, list(zip(texts, starts)), impossible, wq)


def _load_json_or_lines(path: Path):
    """A JSON document, or the rows of a JSON-lines file (what ``Dataset.to_json`` writes)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(f"{path} is not valid JSON (not UTF-8 text); is it the right file?") from None
    except OSError as e:
        raise DataFormatError(f"cannot read {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        whole = e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == 1:  # not JSON lines either: report the whole-document error
                e = whole
                raise DataFormatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download or "
                                      "re-export the file") from None
            raise DataFormatError(f"{path} is not valid JSON lines ({e.msg} on line {n}); re-download or re-export "
                                  "the file") from None
    return rows


def _is_official(data) -> bool:
    return isinstance(data, Mapping) and isinstance(data.get("data"), list) and (
        "version" in data or any(isinstance(a, dict) and "paragraphs" in a for a in data["data"][:1]))


def read_squad(source, *, split: str | None = None, version: str | None = None, keep_impossible: bool = True,
               on_bad: str = "skip") -> tuple[list[dict], QAReport]:
    """Read SQuAD-style QA from ``source`` (a path to official JSON, JSON / JSON-lines rows or a ``save_to_disk``
    folder; a ``datasets.Dataset`` / ``DatasetDict``; a parsed official document; or a list of row dicts) into
    examples, in file order.

    ``version`` ("1.1" / "2.0") only matters for row layouts: with "1.1" an empty answer list is a bad record,
    otherwise it marks an unanswerable question. ``split`` picks the split of a ``DatasetDict``.
    """
    if version not in (None, "1.1", "2.0"):
        raise ValueError(f"version must be '1.1', '2.0' or None, not {version!r}")
    b = _Builder(keep_impossible, on_bad)
    where = type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        path = where = Path(source)
        if path.is_dir():
            import datasets

            try:
                source = datasets.load_from_disk(str(path))
            except FileNotFoundError as e:
                raise DataFormatError(f"{path} is a folder but not one written by datasets' save_to_disk ({e}); "
                                      "point to the saved dataset or a JSON file") from None
        elif path.is_file():
            source = _load_json_or_lines(path)
            if isinstance(source, Mapping) and not _is_official(source) and isinstance(source.get("data"), list):
                source = source["data"]  # {"data": [rows]}, as some exports write rows
            elif isinstance(source, Mapping) and "context" in source:
                source = [source]  # a JSON-lines file of one row
            if not isinstance(source, (list, Mapping)):
                raise DataFormatError(f"{path}: expected SQuAD JSON ({{'version', 'data': [{{'paragraphs'}}]}}) or "
                                      f"rows with id/context/question/answers, got {type(source).__name__}")
        else:
            raise DataFormatError(f"QA data {path} does not exist; check the data.* paths of the config")
    if isinstance(source, Mapping) and not _is_official(source):
        if not source or not all(hasattr(v, "column_names") for v in source.values()):
            raise DataFormatError(f"{where}: expected SQuAD JSON ({{'version', 'data': [{{'paragraphs'}}]}}), rows "
                                  "with id/context/question/answers, or a datasets Dataset / DatasetDict")
        if split not in source:  # a DatasetDict
            raise DataFormatError(f"{where} holds splits {sorted(source.keys())}; pass split= one of them")
        source, where = source[split], f"{where}[{split}]"
    if _is_official(source):
        _read_official(source, str(where), b)
    else:
        _read_rows(source, str(where), b, empty_is_impossible=version != "1.1")
    return b.examples, b.report
