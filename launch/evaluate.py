"""Evaluate a trained plugin: target perplexity and the task's generation metrics on a split.

    python launch/evaluate.py --task caption --plugin runs/caption_offline/plugin            # BLEU-4, CIDEr-D
    python launch/evaluate.py --task vqa --plugin runs/vqa_offline/plugin --limit 500        # VQA accuracy
    python launch/evaluate.py --task qa --plugin runs/qa_offline/plugin --beams 3            # exact match, F1
    python launch/evaluate.py --task qa --plugin DIR --config my_squad.yaml data.val_annotations=dev-v2.0.json

The data come from --config (default configs/<task>_offline.yaml) and dotted overrides; the model, adaptor and
layout from the plugin; a unified plugin (launch/merge.py, launch/train_joint.py) is routed for the task and
laid out by the data config. Writes eval_<split>.json beside the plugin directory (or --out): metrics, perplexity, data counts and a few
example generations.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mtcpeft.build import config_from_manifest, load_task_model  # noqa: E402
from mtcpeft.cli import run_cli  # noqa: E402
from mtcpeft.config import ConfigError, load_config  # noqa: E402
from mtcpeft.evaluate import evaluate_task  # noqa: E402
from mtcpeft.io import write_json  # noqa: E402
from mtcpeft.train import configure_cpu_threads  # noqa: E402
from mtcpeft.joint import build_joint_model, generated_group  # noqa: E402
from mtcpeft.merge import route_map  # noqa: E402
from mtcpeft.plugin import read_manifest  # noqa: E402
from tasks import TASKS, get_task  # noqa: E402
from tasks.base import SequenceLayout  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help=f"registered task: {', '.join(TASKS.names())}")
    ap.add_argument("--plugin", required=True, help="plugin directory written by launch/train_task.py")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--config", help="YAML config for the data (default: configs/<task>_offline.yaml)")
    ap.add_argument("--limit", type=int, help="evaluate the first N examples of the split only")
    ap.add_argument("--beams", type=int, default=1, help="beam search width (1 = greedy)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="metrics JSON path (default: eval_<split>.json beside the plugin)")
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    ap.add_argument("overrides", nargs="*", help="dotted data overrides, e.g. data.source=squad data.val_annotations=F")
    args = ap.parse_args(argv)
    configure_cpu_threads()
    default = ROOT / "configs" / f"{args.task}_offline.yaml"
    data_cfg = load_config(args.config or (default if default.is_file() else None), args.overrides)
    if "routes" in read_manifest(args.plugin):  # a unified (merged / jointly trained) plugin: route the task
        model, tokenizer, manifest = build_joint_model(args.plugin, args.lm)
        task = get_task(args.task)
        cfg = data_cfg
        T = model.encoder.num_tokens if task.uses_images and model.encoder is not None else 0
        layout = SequenceLayout(T, cfg.data.seq_len, cfg.data.max_target_tokens)
        routing = {"routes": route_map(manifest, task.name, task.contexts),
                   "generated_context": generated_group(manifest, task)}
    else:
        model, tokenizer, layout, task, manifest = load_task_model(args.plugin, lm=args.lm)
        if manifest["task"] != TASKS.get(args.task).name:
            raise ConfigError(f"{args.plugin} is a {manifest['task']!r} plugin, not {args.task!r}; pass --task "
                              f"{manifest['task']} (or a plugin trained for {args.task})")
        cfg = config_from_manifest(manifest, args.lm)  # model, adaptor and layout as trained
        cfg.data = data_cfg.data
        cfg.data.seq_len, cfg.data.max_target_tokens = layout.seq_len, layout.max_target_tokens
        routing = {}
    cfg.task = task.name
    cfg.output_dir = str(Path(args.plugin).parent)  # feature caches sit beside the plugin's run
    if args.limit:
        setattr(cfg.data, f"{args.split}_limit", args.limit)
    result = {"task": task.name, "plugin": str(args.plugin), "beams": args.beams,
              **evaluate_task(cfg, task, model, tokenizer, layout, args.split, args.beams, args.batch_size, **routing)}
    out = Path(args.out) if args.out else Path(args.plugin).parent / f"eval_{args.split}.json"
    write_json(result, out)
    print(json.dumps({"perplexity": result["perplexity"]["ppl"], **result["metrics"]}, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
