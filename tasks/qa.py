"""Text question answering (SQuAD v1.1 / v2.0, or easy-VQA scenes described in words offline):

    [BOS] Passage: <passage ...> Question: <question> Answer: <answer ... [EOS]> <padding>
    ctx:  question ...                                     answer ...        -1
    loss: only on the answer and [EOS]

The passage is shortened from its start when the prompt does not fit ``data.seq_len`` (counted as truncated).
Answers are generated, not extracted, and scored with SQuAD's exact match and token F1 after its answer
normalisation (max over the gold answers); SQuAD v2.0 unanswerable questions are left out of training unless
``data.drop_impossible=false``, where the target becomes "unanswerable".
"""
from __future__ import annotations

from mtcpeft.data.sources import easyvqa_qa_source, hf_qa_source, squad_source
from mtcpeft.data.task import Segment, SequenceLayout, Task, register_task

UNANSWERABLE = "unanswerable"


@register_task
class QATask(Task):
    name = "qa"
    contexts = ("question", "answer")
    generated_context = "answer"
    bos_context = "question"
    uses_images = False
    sources = {"easyvqa": easyvqa_qa_source, "squad": squad_source, "hf": hf_qa_source}
    metric = "f1"
    inputs = ("context", "question")

    def prompt_segments(self, example: dict, tokenizer, layout: SequenceLayout) -> list[Segment]:
        q = self.vocab.id("question")
        passage = tokenizer("Passage: " + example["context"].strip(), add_special_tokens=False)["input_ids"]
        question = tokenizer(f" Question: {example['question'].strip()} Answer:", add_special_tokens=False)["input_ids"]
        return [Segment(q, passage, trim=True), Segment(q, question)]

    def target_text(self, example: dict) -> str:
        if example.get("impossible"):
            return " " + UNANSWERABLE
        answers = [a for a in example.get("answers", []) if a.strip()]
        return " " + answers[0].strip() if answers else ""

    def example_id(self, example: dict):
        return example["id"]

    def score(self, predictions: dict, examples: list[dict]) -> dict:
        from mtcpeft.evaluation.metrics.squad import squad_scores

        gold = {e["id"]: ([] if e.get("impossible") else e["answers"]) for e in examples if e["id"] in predictions}
        preds = {k: ("" if v.strip().lower() == UNANSWERABLE else v) for k, v in predictions.items() if k in gold}
        scores = squad_scores(preds, gold)
        return {k: scores[k] for k in ("exact_match", "f1", "count", "missing")}
