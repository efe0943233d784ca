"""Visual question answering (VQA v2 or easy-VQA offline):

    [BOS] <T image tokens> Question: <question> Answer: <answer ... [EOS]> <padding>
    ctx:  question image x T  question ...                answer ...        -1
    loss: only on the answer and [EOS]

The generated answer is scored with the standard VQA accuracy (min(#humans agreeing / 3, 1), averaged over the
10-choose-9 subsets of the 10 human answers, after the official answer normalisation); the training target is the
dataset's ``multiple_choice_answer`` (the most common human answer).
"""
from __future__ import annotations

from mtcpeft.data.sources import easyvqa_vqa_source, hf_vqa_source, vqa2_source
from mtcpeft.data.task import Segment, SequenceLayout, Task, register_task

PROMPT = "Question: {question} Answer:"


@register_task
class VQATask(Task):
    name = "vqa"
    contexts = ("image", "question", "answer")
    generated_context = "answer"
    bos_context = "question"
    uses_images = True
    sources = {"easyvqa": easyvqa_vqa_source, "vqa2": vqa2_source, "hf": hf_vqa_source}
    metric = "vqa_accuracy"
    inputs = ("image", "question")

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
