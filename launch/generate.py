"""Generate with a trained plugin of any task (greedy, or beam search with --beams N > 1).

    python launch/generate.py --plugin runs/caption_offline/plugin --image path/to/image.png      # a caption
    python launch/generate.py --plugin runs/vqa_offline/plugin --image a.png --question "what shape is in the image?"
    python launch/generate.py --plugin runs/qa_offline/plugin --passage "The picture shows ..." --question "..."

Repeat --image (captioning) to caption several images in one batch. The plugin's task says which of --image,
--question and --passage it reads (``Task.inputs``); a plugin of a task of your own package: --task-module.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli
from mtcpeft.config import ConfigError
from mtcpeft.data.dataset import check_images, open_image
from mtcpeft.data.task import get_task
from mtcpeft.evaluation.generation import generate_texts
from mtcpeft.models.vision import image_transform
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.manifest import Manifest

FLAGS = {"image": "--image", "question": "--question", "context": "--passage"}  # example field -> its option


def build_examples(task, images: list[str], question: str | None, passage: str | None) -> list[dict]:
    """The example dicts the task's prompt reads, from the command line; names what is missing or unreadable."""
    given = {"image": bool(images), "question": question is not None, "context": passage is not None}
    missing = [FLAGS.get(k, k) for k in task.inputs if not given.get(k)]
    if missing:
        raise ConfigError(f"a {task.name} plugin needs {' and '.join(missing)}")
    unused = [FLAGS[k] for k, v in given.items() if v and k not in task.inputs]
    if unused:  # not silently ignored: the user may have the wrong plugin
        raise ConfigError(f"a {task.name} plugin reads no {' or '.join(unused)}; drop it (or pass a plugin of "
                          "another task)")
    if task.uses_images:
        for p in images:
            if not Path(p).is_file():
                raise ConfigError(f"image {p} does not exist")
        check_images(images, on_bad="fail", progress=False)  # decodes each: a truncated file is named here
        return [{"image": p, "question": question} for p in images]
    return [{"context": passage, "question": question}]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", required=True, help="plugin directory written by launch/train_task.py")
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    ap.add_argument("--question", help="question (vqa, qa)")
    ap.add_argument("--passage", help="passage the question is about (qa)")
    ap.add_argument("--beams", type=positive_int, default=1, help="beam search width (1 = greedy)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the plugin's target budget")
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    add_task_module_option(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    load_task_modules(args)
    # the inputs are checked before the (slow) model is built
    manifest = Manifest.read(args.plugin)
    examples = build_examples(get_task(manifest.task), args.image, args.question, args.passage)
    loaded = load_model(args.plugin, args.lm, manifest=manifest)
    model, tokenizer, layout, task = loaded.model, loaded.tokenizer, loaded.layout, loaded.task
    image_input = None
    if task.uses_images:
        transform = image_transform(model.encoder, train=False, augment=False)
        image_input = lambda i: {"pixel_values": transform(open_image(examples[i]["image"]))}  # noqa: E731
    texts = generate_texts(model, tokenizer, layout, task, examples, image_input, args.beams, args.max_new_tokens)
    for e, text in zip(examples, texts):
        print(f"{e.get('image') or e['question']}\t{text}")
    return texts


if __name__ == "__main__":
    run_cli(main)
