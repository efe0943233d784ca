"""Generate with a trained plugin of any task (greedy, or beam search with --beams N > 1).

    python launch/generate.py --plugin runs/caption_offline/plugin --image path/to/image.png      # a caption
    python launch/generate.py --plugin runs/vqa_offline/plugin --image a.png --question "what shape is in the image?"
    python launch/generate.py --plugin runs/qa_offline/plugin --passage "The picture shows ..." --question "..."

Repeat --image (captioning) to caption several images in one batch. The plugin's task says which of --image,
--question and --passage it reads (``Task.inputs``); a plugin of a task of your own package: --task-module.

Requests of several tasks, served in one batched generate by a unified plugin (launch/merge.py,
launch/train_joint.py), each row routed by its own task (a task plugin takes requests of its own task only):

    python launch/generate.py --plugin runs/unified/plugin --request caption image=a.png \\
        --request vqa image=a.png "question=what shape is in the image?" \\
        --request qa "passage=The picture shows a red circle." "question=what color is the shape?"
    python launch/generate.py --plugin runs/unified/plugin --requests requests.jsonl

--request takes a task, then FIELD=VALUE words (image=FILE, question=TEXT, passage=TEXT; quote a word that holds
spaces). --requests FILE reads JSON lines, {"task": "vqa", "image": "a.png", "question": "..."} (also "passage"),
image paths relative to the file. Each output line is task, question (or image) and text, tab-separated, in request
order. A unified plugin lays out each task as configs/<task>_offline.yaml says, or as --config FILE says; dotted
data overrides (data.seq_len=160 data.max_target_tokens=20) go before the first --request or after --.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli
from mtcpeft.config import ConfigError, load_config
from mtcpeft.data.dataset import check_images
from mtcpeft.data.task import get_task, offline_config
from mtcpeft.evaluation.requests import Request, check_requests, generate_requests, read_requests, request_from_words
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


def build_requests(args, manifest: Manifest) -> list[Request]:
    """The requests of the command line: --request / --requests, or the plugin's own task from --image,
    --question and --passage."""
    single = bool(args.image) or args.question is not None or args.passage is not None
    if args.request or args.requests:
        if single:
            raise ConfigError("pass either --image/--question/--passage (one task plugin's inputs) or --request / "
                              "--requests (each naming its task), not both")
        listed = [request_from_words(words) for words in args.request]
        return listed + [r for path in args.requests for r in read_requests(path)]
    if manifest.unified:
        raise ConfigError(f"the unified plugin {manifest.task!r} serves several tasks: name each request's task, "
                          "e.g. --request vqa image=a.png 'question=what shape?' (or --requests FILE)")
    task = get_task(manifest.task)
    examples = build_examples(task, args.image, args.question, args.passage)
    return [Request(task.name, image=e.get("image"), question=e.get("question"), passage=e.get("context"))
            for e in examples]


def layout_data(args, manifest: Manifest, names: set[str]):
    """{task: data config} laying out a unified plugin's tasks: --config, else each task's offline default, with
    the dotted overrides; None for a task plugin (it keeps its trained layout)."""
    if not manifest.unified:
        if args.config or args.overrides:
            raise ConfigError("a task plugin generates with the layout it was trained with: drop --config and the "
                              "data overrides (they lay out a unified plugin's tasks)")
        return None
    default = lambda name: offline_config(name) if offline_config(name).is_file() else None  # noqa: E731
    return {name: load_config(args.config or default(name), args.overrides).data for name in names}


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
    ap.add_argument("--request", nargs="+", action="append", default=[], metavar=("TASK", "FIELD=VALUE"),
                    help="a request of any task the plugin serves: TASK then image=FILE, question=TEXT, "
                         "passage=TEXT (repeat for several)")
    ap.add_argument("--requests", action="append", default=[], metavar="FILE",
                    help='JSON lines of requests, {"task": ..., "image": ..., "question": ..., "passage": ...}')
    ap.add_argument("--beams", type=positive_int, default=1, help="beam search width (1 = greedy)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: each task's target budget")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="requests per generate call")
    ap.add_argument("--config", help="YAML whose data section lays out a unified plugin's tasks "
                                     "(default: configs/<task>_offline.yaml)")
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    add_task_module_option(ap)
    ap.add_argument("overrides", nargs="*", help="dotted data overrides for a unified plugin, e.g. data.seq_len=160")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    load_task_modules(args)
    # the requests are checked before the (slow) model is built
    manifest = Manifest.read(args.plugin)
    requests = build_requests(args, manifest)
    data = layout_data(args, manifest, {t.name for t in check_requests(manifest, requests)})
    loaded = load_model(args.plugin, args.lm, manifest=manifest)
    texts = generate_requests(loaded, requests, data, args.beams, args.max_new_tokens, args.batch_size)
    for r, text in zip(requests, texts):
        if args.request or args.requests:
            print(f"{r.task}\t{r.question if r.question is not None else r.image}\t{text}")
        else:
            print(f"{r.image or r.question}\t{text}")
    return texts


if __name__ == "__main__":
    run_cli(main)
