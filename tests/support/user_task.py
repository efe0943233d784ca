"""A task of a user's own package, written to disk: a module that registers it with ``register_task`` and,
optionally, the installed-package metadata that declares it as an entry point of the ``mtcpeft.tasks`` group."""
from __future__ import annotations

from pathlib import Path

TASK_MODULE = '''
from mtcpeft.data.sources import easyvqa_qa_source
from mtcpeft.data.task import Segment, Task, register_task


@register_task
class {cls}(Task):
    name = "{name}"
    contexts = ("prompt", "reply")
    generated_context = "reply"
    bos_context = "prompt"
    sources = {{"easyvqa": easyvqa_qa_source}}
    metric = "exact"
    inputs = ("question",)

    def prompt_segments(self, example, tokenizer, layout):
        ids = tokenizer(" Q: " + example["question"].strip() + " A:", add_special_tokens=False)["input_ids"]
        return [Segment(self.vocab.id("prompt"), ids)]

    def target_text(self, example):
        return " " + example["answers"][0].strip()

    def example_id(self, example):
        return example["id"]

    def score(self, predictions, examples):
        gold = {{e["id"]: e["answers"][0].strip() for e in examples}}
        hits = [predictions[k].strip() == gold[k] for k in predictions if k in gold]
        return {{"exact": sum(hits) / max(len(hits), 1)}}
'''


def write_user_task(root: Path, package: str, name: str, entry_point: bool = False) -> str:
    """``<root>/<package>/tasks.py`` defining task ``name``; returns its module name. ``entry_point``: also a
    ``<package>-0.1.dist-info`` declaring ``name = <package>.tasks:UserTask`` in the ``mtcpeft.tasks`` group (what
    ``pip install`` of a package with that entry point leaves on its path)."""
    pkg = root / package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(TASK_MODULE.format(cls="UserTask", name=name))
    if entry_point:
        info = root / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[mtcpeft.tasks]\n{name} = {package}.tasks:UserTask\n")
    return f"{package}.tasks"
