"""Image captioning, laid out as in Context-PEFT (arXiv 2312.08900, section 4):

    [BOS] <T projected image tokens> <caption tokens ... [EOS]> <padding to seq_len>
    ctx:  text  image x T            text ...                 -1
    loss: only on the caption tokens and [EOS] (the last positions of the sequence)

The paper uses T = 64 (Swin V2), seq_len 128, so a caption has up to 63 tokens counting [EOS]. Data: COCO's
official caption JSON or the Karpathy split (:mod:`mtcpeft.data.coco`), a Hugging Face ``datasets`` split
(``data.source=hf``), or easy-VQA offline. Metrics: BLEU-4 and
CIDEr-D of one generated caption per image against all of its references.
"""
from __future__ import annotations

from mtcpeft.data.sources import coco_caption_source, easyvqa_caption_source, hf_caption_source, karpathy_source
from mtcpeft.data.task import Segment, SequenceLayout, Task, register_task


@register_task
class CaptionTask(Task):
    name = "caption"
    contexts = ("image", "text")
    generated_context = "text"
    bos_context = "text"
    uses_images = True
    sources = {"easyvqa": easyvqa_caption_source, "coco": coco_caption_source, "karpathy": karpathy_source,
               "hf": hf_caption_source}
    metric = "cider"
    inputs = ("image",)

    def prompt_segments(self, example: dict, tokenizer, layout: SequenceLayout) -> list[Segment]:
        return [self.image_segment(layout)]

    def target_text(self, example: dict) -> str:
        return example.get("caption") or ""

    def example_id(self, example: dict):
        return example["image_id"]

    def score(self, predictions: dict, examples: list[dict]) -> dict:
        from mtcpeft.evaluation.metrics.caption import caption_scores

        refs: dict = {}
        for e in examples:  # one example per caption: gather every reference of an image
            refs.setdefault(e["image_id"], set()).update(e.get("references") or [e["caption"]])
        refs = {k: sorted(v) for k, v in refs.items() if k in predictions}
        scores = caption_scores({k: v for k, v in predictions.items() if k in refs}, refs)
        return {k: v for k, v in scores.items() if not isinstance(v, dict)}
