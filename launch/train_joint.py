"""Continue training a unified plugin (launch/merge.py) on mixed-task batches, one or many processes.

    accelerate launch launch/train_joint.py --plugin runs/merged --tasks vqa,caption,qa
    accelerate launch --config_file configs/accelerate/ddp.yaml launch/train_joint.py --plugin DIR --tasks vqa,qa
    accelerate launch --config_file configs/accelerate/zero2.yaml launch/train_joint.py --plugin DIR --tasks vqa

A batch mixes examples of every listed task; each token is routed to its plugin group by the plugin's routing
table (no adapter switching). Each task's data section comes from configs/<task>_offline.yaml (or --data
TASK=FILE.yaml) with the joint run's layout and limits (configs/joint_offline.yaml, or --config, and dotted
overrides). Validation perplexity is reported per task; after training, each task's generation metric on
--eval-limit validation examples. Output: plugin/ (the unified plugin, best epoch), checkpoint/ (resumable:
train.resume=true), results.json, config.yaml, tb/; an output_dir holding a previous run is refused unless
resumed or replaced (--overwrite). On CPU: see configs/accelerate/*.yaml for the launch routes.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli
from mtcpeft.config import ConfigError, load_config
from mtcpeft.data.task import get_task, offline_config
from mtcpeft.evaluation.evaluate import evaluate_task
from mtcpeft.io import UnsafeWriteError
from mtcpeft.plugins.load import load_model
from mtcpeft.plugins.merge import task_routes
from mtcpeft.training.joint import joint_datasets, mixed_collate, save_joint_plugin, task_data_config
from mtcpeft.training.run import end_run, fit_run, run_results, start_run
from mtcpeft.training.trainer import make_accelerator, trainable_digest, zero_stage


def parse_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, eq, path = item.partition("=")
        if not eq:
            raise ConfigError(f"bad --data {item!r}: expected TASK=FILE.yaml")
        out[task] = path
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", required=True, help="unified plugin (launch/merge.py) or any task plugin")
    ap.add_argument("--tasks", required=True, help="comma-separated tasks the plugin routes, e.g. vqa,caption,qa")
    ap.add_argument("--config", help="YAML run config (default: configs/joint_offline.yaml)")
    ap.add_argument("--data", action="append", default=[], help="TASK=FILE.yaml: that task's data section")
    ap.add_argument("--eval-limit", type=int, default=200, help="validation examples per task for generation "
                    "metrics after training (0: skip)")
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    ap.add_argument("--overwrite", action="store_true", help="replace the previous run in output_dir (its plugin, "
                    "checkpoint and results; other files are kept)")
    add_task_module_option(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 train.max_steps=100")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_task_modules(args)
    cfg = load_config(args.config or offline_config("joint"), args.overrides)
    cfg.task = "joint"
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    chosen = [get_task(n) for n in names]
    data_files = parse_data(args.data)
    out = Path(cfg.output_dir)
    if args.overwrite and out.resolve() in Path(args.plugin).resolve().parents:
        raise UnsafeWriteError(f"--plugin {args.plugin} lies inside output_dir {out}, which --overwrite clears; "
                               "copy the plugin elsewhere or choose another output_dir")
    start_run(cfg, args.overwrite)
    loaded = load_model(args.plugin, args.lm)  # before the Accelerator (training/run.py)
    model, tokenizer, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    acc = make_accelerator(cfg.train, cfg.output_dir, find_unused_parameters=True)
    routed = list(task_routes(manifest))
    unrouted = [n for n in names if n not in routed]
    if unrouted:
        raise ConfigError(f"the plugin routes no task {unrouted[0]!r} (it routes {', '.join(routed)}); "
                          f"merge with --route {unrouted[0]}.<context>=<group> for each of its contexts")
    with acc.main_process_first():
        data = joint_datasets(cfg, chosen, model, tokenizer, manifest, data_overrides=data_files,
                              progress=acc.is_local_main_process)
    for name, reports in data["reports"].items():
        for split, report in reports.items():
            acc.print(f"[{name}] {report.summary(split)}")
    trainer, state = fit_run(cfg, model, data["train"], data["val"], acc,
                             lambda m, plugin, tensors: save_joint_plugin(m, manifest, plugin, names, tensors),
                             collate=mixed_collate)
    digests = acc.gather_for_metrics([trainable_digest(acc, trainer.model)], use_gather_object=True)
    results = {"tasks": names, **run_results(trainer, state), "zero_stage": zero_stage(acc), "rank_digests": digests,
               "metrics": {}}
    trainer.finish()
    if args.eval_limit and zero_stage(acc) != 3 and acc.is_main_process:  # generation on one process
        unwrapped = acc.unwrap_model(trainer.model).eval()
        for task in chosen:
            tcfg = task_data_config(task.name, cfg, overrides=data_files)
            tcfg.data.val_limit = args.eval_limit
            ev = evaluate_task(tcfg, task, unwrapped, tokenizer, data["layouts"][task.name], "val",
                               **loaded.routing(task))
            results["metrics"][task.name] = {"perplexity": ev["perplexity"]["ppl"], **ev["metrics"]}
            acc.print(f"[{task.name}] {task.metric} {ev['metrics'][task.metric]:.4f} "
                      f"(final model, {ev['predictions']} validation predictions)")
    end_run(acc, results, out, state)
    return results


if __name__ == "__main__":
    run_cli(main)
