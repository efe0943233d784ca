"""Visual question answering (VQA v2 or easy-VQA offline):

    [BOS] <T image tokens> Question: <question> Answer: <answer ... [EOS]> <padding>
    ctx:  question image x T  question ...                answer ...        -1
    loss: only on the answer and [EOS]

The generated answer is scored with the standard VQA accuracy (min(#humans agreeing / 3, 1), averaged over the
10-choose-9 subsets of the 10 human answers, after the official answer normalisation); the training target is the
dataset's ``multiple_choice_answer`` (the most common human answer).
"""
from __future__ import annotations

from mtcpeft.data.task import Segment, SequenceLayout, Task, register_task
from .caption import need, need_dir

PROMPT = "Question: {question} Answer:"


@register_task
class VQATask(Task):
    name = "vqa"
    contexts = ("image", "question", "answer")
    generated_context = "answer"
    bos_context = "question"
    uses_images = True
    sources = ("easyvqa", "vqa2")
    metric = "vqa_accuracy"

    def examples(self, split: str, data) -> list[dict]:
        return self.read(split, data)[0]

    def read(self, split: str, data) -> tuple[list[dict], str]:
        if data.source == "easyvqa":
            from mtcpeft.data.easyvqa_tasks import easyvqa_vqa

            return easyvqa_vqa(split), ""
        if data.source == "vqa2":
            from mtcpeft.data.vqa2 import read_vqa2

            q, a = ("questions", "annotations") if split == "train" else ("val_questions", "val_annotations")
            images = "val_images" if split != "train" and data.val_images else "images"
            path = need(getattr(data, q), f"data.{q}", exists=True)
            anns = getattr(data, a) and need(getattr(data, a), f"data.{a}", exists=True)
            examples, report = read_vqa2(path, anns, need_dir(getattr(data, images), f"data.{images}"),
                                         data.image_pattern)
            note = report.summary(split).partition(": ")[2]
            return examples, note + ("" if anns else f"; data.{a} is not set: questions without answers")
        raise ValueError(f"the vqa task reads data.source {', '.join(self.sources)}, not {data.source!r}")

    def prompt_segments(self, example: dict, tokenizer, layout: SequenceLayout) -> list[Segment]:
        text = tokenizer(" " + PROMPT.format(question=example["question"].strip()), add_special_tokens=False)
        return [self.image_segment(layout), Segment(self.vocab.id("question"), text["input_ids"])]

    def target_text(self, example: dict) -> str:
        answer = (example.get("answer") or "").strip()
        return " " + answer if answer else ""

    def example_id(self, example: dict):
        return example["question_id"]

    def score(self, predictions: dict, examples: list[dict]) -> dict:
        from mtcpeft.evaluation.metrics.vqa import vqa_accuracy

        refs = {e["question_id"]: e["answers"] for e in examples if e["question_id"] in predictions and e.get("answers")}
        scores = vqa_accuracy(predictions, refs)
        return {"vqa_accuracy": scores["accuracy"], "count": scores["count"], "missing": scores["missing"]}
