"""Requests of different tasks served together: caption this image, answer this question about this image, answer
this question from this passage — in one batched ``generate`` on a unified plugin, each row packed by its own
task, its context ids routed by its task's route table and its new tokens in its task's generated group::

    loaded = load_model("runs/unified/plugin")             # mtcpeft.plugins.load; `import tasks` registers the tasks
    texts = generate_requests(loaded, [
        Request("caption", image="a.png"),
        Request("vqa", image="a.png", question="what shape is in the image?"),
        Request("qa", passage="The picture shows a red circle.", question="what color is the shape?"),
    ], data=cfg.data)                                     # lays out a unified plugin's tasks (seq_len, budgets)

Each text equals what its request generates alone. A task plugin serves requests of its own task only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from mtcpeft.data.dataset import check_images, open_image
from mtcpeft.data.image_ref import RowImage
from mtcpeft.data.task import Task, get_task
from mtcpeft.errors import MtcpeftError
from mtcpeft.models.vision import image_transform
from mtcpeft.plugins.merge import task_routes
from .generation import Row, generate_rows, route_prompt

FIELDS = {"image": "image", "question": "question", "context": "passage"}  # example field -> Request attribute


class RequestError(MtcpeftError, ValueError):
    """A generation request the plugin cannot serve (another task, a missing or unused input, a bad image)."""


@dataclass
class Request:
    """One thing to generate: a task's name and its inputs.

    image: a file path, a PIL image, pixels ``(3, H, W)`` already transformed for the encoder, or cached encoder
    features ``(T, D)``; question; passage (what QA reads); fields: other example fields a task of your own reads.
    """

    task: str | Task  # a registered task's name (or the task itself)
    image: str | os.PathLike | Image.Image | torch.Tensor | None = None
    question: str | None = None
    passage: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def example(self) -> dict:
        """The example dict the task's prompt reads (``passage`` is its ``context``)."""
        given = {key: getattr(self, attr) for key, attr in FIELDS.items() if getattr(self, attr) is not None}
        return {**self.fields, **given}


def request_from_words(words: list[str]) -> Request:
    """``["vqa", "image=a.png", "question=what shape?"]`` (the words of one ``--request``) -> a Request: the
    task, then FIELD=VALUE items (image, question, passage, or a field a task of your own reads)."""
    if not words:
        raise RequestError("--request needs a task, e.g. --request vqa image=a.png 'question=what shape?'")
    task, values = words[0], {}
    for item in words[1:]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RequestError(f"--request {task}: {item!r} is not FIELD=VALUE (image=FILE, question=TEXT, "
                               "passage=TEXT); quote an item that holds spaces")
        if "." in key:
            raise RequestError(f"--request {task}: {item!r} looks like a data override; put overrides before the "
                               "first --request, or after --")
        if key in values:
            raise RequestError(f"--request {task}: {key} is given twice")
        values[key] = value
    return _request(task, values)


def read_requests(path: str | os.PathLike) -> list[Request]:
    """The requests of a JSONL file, one JSON object a line: ``{"task": "vqa", "image": "a.png", "question": ...}``
    (also ``"passage"``, or fields a task of your own reads); a relative image path is relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"requests file {path} does not exist")
    requests = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{n} is not JSON ({e.msg}); write one object a line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("task"), str):
            raise RequestError(f"{path}:{n} must be a JSON object with a \"task\" name, e.g. "
                               '{"task": "caption", "image": "a.png"}')
        values = {k: v for k, v in obj.items() if k != "task"}
        if isinstance(values.get("image"), str):
            values["image"] = str(path.parent / values["image"])  # an absolute path stays as it is
        requests.append(_request(obj["task"], values))
    return requests


def _request(task: str, values: dict) -> Request:
    named = {attr: values.pop(attr) for attr in FIELDS.values() if attr in values}
    return Request(task, **named, fields=values)


def check_requests(manifest, requests: list[Request]) -> list[Task]:
    """The task of each request, after checking that the plugin (its :class:`Manifest`) serves it and that the
    request gives exactly the inputs its task reads; nothing is loaded but the images' headers and data."""
    if not requests:
        raise RequestError("no requests: pass at least one Request(task, image=..., question=..., passage=...)")
    served = task_routes(manifest)
    tasks = []
    for n, r in enumerate(requests, 1):
        task = r.task if isinstance(r.task, Task) else get_task(r.task)
        what = f"request {n} ({task.name})"
        if task.name not in served:
            if manifest.unified:
                raise RequestError(f"{what}: the unified plugin {manifest.task!r} does not route {task.name!r} (it "
                                   f"serves {', '.join(served)}); drop the request or merge a plugin that serves it")
            raise RequestError(f"{what}: this is a {manifest.task!r} plugin, it serves {manifest.task!r} requests "
                               f"only; load a plugin trained for {task.name!r} or a unified plugin that routes it")
        example = r.example()
        missing = [FIELDS.get(k, k) for k in task.inputs if example.get(k) is None]
        if missing:
            raise RequestError(f"{what} needs {' and '.join(missing)}")
        unused = [FIELDS.get(k, k) for k in example if k not in task.inputs]
        if unused:  # not silently ignored: the request may name the wrong task
            raise RequestError(f"{what} reads no {' or '.join(unused)}; drop it or name the task that reads it")
        if task.uses_images:
            _check_image(r.image, what, manifest)
        tasks.append(task)
    return tasks


def _check_image(image, what: str, manifest) -> None:
    if isinstance(image, torch.Tensor):
        if image.dim() not in (2, 3):
            raise RequestError(f"{what}: an image tensor is pixels (3, H, W) or encoder features (T, D), not shape "
                               f"{tuple(image.shape)}")
        if image.dim() == 2:
            return
    if manifest.vision is None:
        raise RequestError(f"{what}: the plugin has no vision encoder; pass the image's encoder features (T, D)")
    if isinstance(image, (str, os.PathLike)):
        if not isinstance(image, RowImage) and not Path(image).is_file():
            raise RequestError(f"{what}: image {image} does not exist")
        check_images([image if isinstance(image, RowImage) else str(image)], on_bad="fail", progress=False)  # decodes it: a truncated file is named here
    elif not isinstance(image, (Image.Image, torch.Tensor)):
        raise RequestError(f"{what}: image must be a path, a PIL image or a tensor, not {type(image).__name__}")


def _layout_data(data, task: Task, manifest):
    """The data config laying out ``task`` on a unified plugin: ``data`` or ``data[task.name]``."""
    if not manifest.unified:
        return data  # a task plugin keeps the layout it was trained with
    chosen = data.get(task.name) if isinstance(data, dict) else data
    if chosen is None:
        raise RequestError(f"a unified plugin lays out each task as a data config says (seq_len, "
                           f"max_target_tokens): pass data=cfg.data, or {{task: data}} with {task.name!r} in it")
    return chosen


def _image_input(image, transform: Callable[[], Callable]) -> Callable[[], dict] | None:
    """A zero-argument callable giving the request's image input (read when its batch is built)."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        key = "image_features" if image.dim() == 2 else "pixel_values"
        return lambda: {key: image}
    if isinstance(image, Image.Image):
        return lambda: {"pixel_values": transform()(image.convert("RGB"))}
    path = image if isinstance(image, RowImage) else str(image)  # a row of a datasets table stays one
    return lambda: {"pixel_values": transform()(open_image(path))}


def generate_requests(loaded, requests: list[Request], data=None, beams: int = 1, max_new_tokens: int | None = None,
                      batch_size: int = 16, progress: bool = False) -> list[str]:
    """One generated text per request, in order, ``batch_size`` requests of any tasks per ``generate`` call.

    ``loaded``: a :class:`~mtcpeft.plugins.load.Loaded` plugin. ``data``: how a unified plugin lays out the tasks —
    a data config (``seq_len``, ``max_target_tokens``) for every task, or ``{task name: data config}``; a task
    plugin keeps its trained layout. ``max_new_tokens``: default each task's ``max_target_tokens``.
    """
    tasks = check_requests(loaded.manifest, requests)
    model, tokenizer = loaded.model, loaded.tokenizer
    plans: dict[str, tuple] = {}  # task name -> (layout, routing)
    for task in tasks:
        if task.name not in plans:
            plans[task.name] = (loaded.layout_for(task, _layout_data(data, task, loaded.manifest)),
                                loaded.routing(task))
    transforms: list = []

    def transform():  # built once, on the first image that needs it
        if not transforms:
            transforms.append(image_transform(model.encoder, train=False, augment=False))
        return transforms[0]

    rows = []
    for task, r in zip(tasks, requests):
        layout, routing = plans[task.name]
        prompt = route_prompt(task.prompt(r.example(), tokenizer, layout), routing["routes"])
        rows.append(Row(prompt, routing["generated_context"], max_new_tokens or layout.max_target_tokens,
                        _image_input(r.image, transform) if task.uses_images else None))
    return generate_rows(model, tokenizer, rows, beams, batch_size, progress,
                         desc=f"generating ({', '.join(sorted(plans))})")
