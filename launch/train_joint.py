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

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accelerate.utils import set_seed  # noqa: E402

from mtcpeft.cli import run_cli  # noqa: E402
from mtcpeft.config import ConfigError, load_config  # noqa: E402
from mtcpeft.evaluation.evaluate import evaluate_task  # noqa: E402
from mtcpeft.io import UnsafeWriteError, prepare_run_dir, write_json  # noqa: E402
from mtcpeft.plugins.load import load_model  # noqa: E402
from mtcpeft.plugins.merge import task_routes  # noqa: E402
from mtcpeft.training.joint import joint_datasets, mixed_collate, save_joint_plugin, task_data_config  # noqa: E402
from mtcpeft.training.trainer import (
    Trainer, configure_cpu_threads, make_accelerator, trainable_digest, zero_stage,
)  # noqa: E402
from tasks import get_task  # noqa: E402


def parse_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, eq, path = item.partition("=")
        if not eq:
            raise ConfigError(f"bad --data {item!r}: expected TASK=FILE.yaml")
        out[task] = path
    return out


def main(argv: list[str] | None = None) -> dict:
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
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 train.max_steps=100")
    args = ap.parse_args(argv)
    cfg = load_config(args.config or ROOT / "configs" / "joint_offline.yaml", args.overrides)
    cfg.task = "joint"
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    tasks = [get_task(n) for n in names]
    out = Path(cfg.output_dir)
    if args.overwrite and out.resolve() in Path(args.plugin).resolve().parents:
        raise UnsafeWriteError(f"--plugin {args.plugin} lies inside output_dir {out}, which --overwrite clears; "
                               "copy the plugin elsewhere or choose another output_dir")
    # before anything is built: a bad output_dir must not cost a model load and an encoding of every image
    prepare_run_dir(out, resume=cfg.train.resume, overwrite=args.overwrite,
                    check_only=os.environ.get("RANK", "0") != "0")

    set_seed(cfg.seed)
    configure_cpu_threads()
    # built before the Accelerator: under ZeRO-3 transformers would otherwise load the LM already partitioned
    loaded = load_model(args.plugin, args.lm)
    model, tokenizer, manifest = loaded.model, loaded.tokenizer, loaded.manifest
    acc = make_accelerator(cfg.train, cfg.output_dir, find_unused_parameters=True)
    routed = list(task_routes(manifest))
    unrouted = [n for n in names if n not in routed]
    if unrouted:
        raise ConfigError(f"the plugin routes no task {unrouted[0]!r} (it routes {', '.join(routed)}); "
                          f"merge with --route {unrouted[0]}.<context>=<group> for each of its contexts")
    with acc.main_process_first():
        data = joint_datasets(cfg, tasks, model, tokenizer, manifest, ROOT / "configs", parse_data(args.data),
                              progress=acc.is_local_main_process)
    for name, reports in data["reports"].items():
        for split, report in reports.items():
            acc.print(f"[{name}] {report.summary(split)}")

    def save_best(trainer: Trainer) -> None:
        state = trainer.acc.get_state_dict(trainer.model)  # gathers ZeRO-3 shards; every rank must call it
        if trainer.acc.is_main_process:
            save_joint_plugin(trainer.acc.unwrap_model(trainer.model), manifest, out / "plugin", names, state)

    trainer = Trainer(cfg, model, data["train"], data["val"], collate=mixed_collate, accelerator=acc,
                      on_best=save_best)
    state = trainer.fit()
    digests = acc.gather_for_metrics([trainable_digest(acc, trainer.model)], use_gather_object=True)
    results = {
        "tasks": names, "best_epoch": state.best_epoch, "best_val_ppl": state.best_val_ppl, "history": state.history,
        "global_step": state.global_step, "trainable_parameters": trainer.num_trainable,
        "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type), "zero_stage": zero_stage(acc),
        "rank_digests": digests, "metrics": {},
    }
    trainer.finish()
    if args.eval_limit and zero_stage(acc) != 3 and acc.is_main_process:  # generation on one process
        unwrapped = acc.unwrap_model(trainer.model).eval()
        for task in tasks:
            tcfg = task_data_config(task.name, cfg, ROOT / "configs", parse_data(args.data))
            tcfg.data.val_limit = args.eval_limit
            ev = evaluate_task(tcfg, task, unwrapped, tokenizer, data["layouts"][task.name], "val",
                               **loaded.routing(task))
            results["metrics"][task.name] = {"perplexity": ev["perplexity"]["ppl"], **ev["metrics"]}
            acc.print(f"[{task.name}] {task.metric} {ev['metrics'][task.metric]:.4f} "
                      f"(final model, {ev['predictions']} validation predictions)")
    if acc.is_main_process:
        write_json(results, out / "results.json")
        acc.print(f"best epoch {state.best_epoch}: val perplexity {state.best_val_ppl:.3f}; plugin: {out / 'plugin'}"
                  if state.best_val_ppl is not None else "no validation: no plugin written")
    return results


if __name__ == "__main__":
    run_cli(main)
