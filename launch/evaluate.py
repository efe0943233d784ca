"""Evaluate a trained plugin: target perplexity and the task's generation metrics on a split.

    python launch/evaluate.py --task caption --plugin runs/caption_offline/plugin            # BLEU-4, CIDEr-D
    python launch/evaluate.py --task vqa --plugin runs/vqa_offline/plugin --limit 500        # VQA accuracy
    python launch/evaluate.py --task qa --plugin runs/qa_offline/plugin --beams 3            # exact match, F1
    python launch/evaluate.py --task qa --plugin DIR --config my_squad.yaml data.val_annotations=dev-v2.0.json

The data are the ones the plugin was trained on (recorded in its plugin.json, or its run's config.yaml), or
--config; dotted overrides change them (data.val_annotations=FILE); the first line printed says which data are
evaluated. The model, adaptor and layout come from the plugin; a unified plugin (launch/merge.py,
launch/train_joint.py) is routed for the task and takes its data from --config (default
configs/<task>_offline.yaml), which also lays it out. Writes eval_<split>.json beside the plugin directory (or
--out): metrics, perplexity, data counts and a few example generations.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
import json
from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli, task_help
from mtcpeft.config import ConfigError, config_from_dict, load_config
from mtcpeft.data.task import get_task, offline_config
from mtcpeft.evaluation.evaluate import evaluate_task
from mtcpeft.io import write_json
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.manifest import Manifest
from mtcpeft.training.trainer import configure_cpu_threads


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def data_config(args, manifest: Manifest):
    """(config whose ``data`` section is evaluated on, where it came from): --config; else the data the plugin was
    trained on (recorded in its manifest, or its run's config.yaml); else configs/<task>_offline.yaml."""
    if args.config:
        return load_config(args.config, args.overrides), args.config
    if not manifest.unified:  # a task plugin: its own training data
        if manifest.data:
            where = Path(args.plugin) / "plugin.json"
            return config_from_dict({"data": manifest.data}, args.overrides, where=where), \
                f"{where} (the data the plugin was trained on)"
        run = Path(args.plugin).parent / "config.yaml"
        if run.is_file() and load_config(run).task == manifest.task:
            return load_config(run, args.overrides), f"{run} (the plugin's training run)"
    default = offline_config(args.task)
    return load_config(default if default.is_file() else None, args.overrides), \
        f"{default} (the task's offline default; pass --config to evaluate on other data)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help=task_help())
    ap.add_argument("--plugin", required=True, help="plugin directory written by launch/train_task.py")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--config", help="YAML config for the data (default: the data the plugin was trained on)")
    ap.add_argument("--limit", type=positive_int, help="evaluate the first N examples of the split only")
    ap.add_argument("--beams", type=positive_int, default=1, help="beam search width (1 = greedy)")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--out", help="metrics JSON path (default: eval_<split>.json beside the plugin)")
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    add_task_module_option(ap)
    ap.add_argument("overrides", nargs="*", help="dotted data overrides, e.g. data.source=squad data.val_annotations=F")
    args = ap.parse_args(argv)
    load_task_modules(args)
    task = get_task(args.task)  # an unknown task or a wrong plugin fails before any model is loaded
    manifest = Manifest.read(args.plugin)
    if not manifest.unified and manifest.task != task.name:
        raise ConfigError(f"{args.plugin} is a {manifest.task!r} plugin, not {args.task!r}; pass --task "
                          f"{manifest.task} (or a plugin trained for {args.task})")
    cfg, origin = data_config(args, manifest)
    configure_cpu_threads()
    loaded = load_model(args.plugin, args.lm, manifest=manifest)
    # a task plugin keeps the layout it was trained with; a unified one lays the task out as its data config says
    layout = loaded.layout_for(task, cfg.data)
    cfg.data.seq_len, cfg.data.max_target_tokens = layout.seq_len, layout.max_target_tokens
    cfg.task = task.name
    cfg.output_dir = str(Path(args.plugin).parent)  # feature caches sit beside the plugin's run
    if args.limit:
        setattr(cfg.data, f"{args.split}_limit", args.limit)
    print(f"evaluating on {cfg.data.describe(args.split)} from {origin}")
    result = {"task": task.name, "plugin": str(args.plugin), "beams": args.beams, "data_from": str(origin),
              **evaluate_task(cfg, task, loaded.model, loaded.tokenizer, layout, args.split, args.beams, args.batch_size,
                              **loaded.routing(task))}
    out = Path(args.out) if args.out else Path(args.plugin).parent / f"eval_{args.split}.json"
    write_json(result, out)
    print(json.dumps({"perplexity": result["perplexity"]["ppl"], **result["metrics"]}, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
