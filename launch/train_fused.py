"""Train several tasks' adaptors fused: ONE process (or one DDP group) and one copy of the frozen backbone.

    python launch/train_fused.py --tasks caption,qa                          # both offline defaults, one pass
    python launch/train_fused.py --tasks caption,qa --set qa.adaptor.kind=ia3 --set qa.train.lr=1e-3
    accelerate launch --config_file configs/accelerate/ddp.yaml launch/train_fused.py --tasks caption,qa
    accelerate launch --config_file configs/accelerate/zero2.yaml launch/train_fused.py --tasks caption,qa  # or zero3
    python launch/train_fused.py --tasks caption,qa train.epochs=1           # key=value: every task
    python launch/train_fused.py --tasks caption,qa --ratio caption=2,qa=1   # qa trains in every other step

Each task reads its own config (<config-dir>/TASK_offline.yaml, or --config TASK=FILE.yaml) and keeps its own
adaptor kind, optimizer, learning rate, clipping, validation and best epoch; every step trains a batch of each
task. Writes <out>/<task>/ (plugin/ exactly as launch/train_task.py writes it, config.yaml, results.json) and
<out>/results.json, and <out>/checkpoint (at every task's epoch end, every train.save_every_steps and at the end)
that `train.resume=true` continues from exactly. See mtcpeft/training/fused.py for the design and what it equals.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
import os
from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli
from mtcpeft.config import ConfigError, load_config
from mtcpeft.data.task import CONFIG_DIR, get_task, offline_config, task_names
from mtcpeft.io import prepare_run_dir
from mtcpeft.training.fused import FusedTrainer, build_fused_model, check_fused_configs, check_ratios, fused_data
from mtcpeft.training.trainer import make_accelerator, release_engine, trainable_digest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", required=True, metavar="TASK,...", help="comma-separated registered tasks")
    ap.add_argument("--out", default="runs/fused", help="directory of the tasks' outputs and results.json")
    ap.add_argument("--config-dir", default=str(CONFIG_DIR), help="holds <task>_offline.yaml per task")
    ap.add_argument("--config", action="append", default=[], metavar="TASK=FILE.yaml", help="a task's own config")
    ap.add_argument("--set", action="append", default=[], metavar="TASK.key=value", dest="sets",
                    help="an override for one task; repeat")
    ap.add_argument("--ratio", default="", metavar="TASK=N,...",
                    help="how often each task takes part in a step: N of every max-N steps (default 1 each: every "
                         "step); the examples per step are each task's train.batch_size")
    ap.add_argument("--overwrite", action="store_true", help="replace the previous run in each task's directory")
    add_task_module_option(ap)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every task, e.g. train.epochs=1")
    return ap.parse_intermixed_args(argv)


def task_configs(args) -> dict:
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"--tasks needs two or more distinct tasks, got {names}; choose from {task_names()}")
    bad = [c for c in args.config if "=" not in c or c.split("=", 1)[0] not in names]
    if bad:
        raise ConfigError(f"--config {bad[0]}: expected TASK=FILE.yaml with TASK one of {names}")
    files = dict(c.split("=", 1) for c in args.config)
    sets: dict[str, list[str]] = {}
    for s in args.sets:
        task, _, override = s.partition(".")
        if task not in names or "=" not in override:
            raise ConfigError(f"--set {s}: expected TASK.key=value with TASK one of {names}")
        sets.setdefault(task, []).append(override)
    cfgs = {}
    for name in names:
        get_task(name)  # an unknown task name fails here, naming the registered ones
        path = files.get(name) or offline_config(name, args.config_dir)
        cfg = load_config(path if Path(path).is_file() else None,
                          [*args.overrides, *sets.get(name, []), f"output_dir={Path(args.out) / name}"])
        cfg.task = name
        cfgs[name] = cfg
    return cfgs


def parse_ratios(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, _, n = part.partition("=")
        if not n.strip().isdigit():
            raise ConfigError(f"--ratio {text}: expected TASK=N,... with whole numbers N >= 1, e.g. caption=2,qa=1")
        out[task.strip()] = int(n)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_task_modules(args)
    cfgs = task_configs(args)
    check_fused_configs(cfgs)
    ratios = check_ratios(parse_ratios(args.ratio), list(cfgs))
    for cfg in cfgs.values():
        prepare_run_dir(cfg.output_dir, resume=cfg.train.resume, overwrite=args.overwrite,
                        check_only=os.environ.get("RANK", "0") != "0")
    tasks_ = {name: get_task(name) for name in cfgs}
    model, extras = build_fused_model(cfgs, tasks_)  # before the Accelerator, as in launch/train_task.py
    first = next(iter(cfgs.values()))
    # the engine of a DeepSpeed run clips nothing: each task clips by its own max_grad_norm (training/fused_zero.py)
    acc = make_accelerator(first.train, args.out, log=False, find_unused_parameters=True, engine_clipping=False)
    with acc.main_process_first():
        data = fused_data(cfgs, tasks_, model, extras, progress=acc.is_local_main_process)
    trainer = FusedTrainer(cfgs, tasks_, model, data, acc, out=args.out, ratios=ratios)
    trainer.fit()
    # equal on every rank of a correct data-parallel run (a collective: every rank computes it)
    digests = acc.gather_for_metrics([trainable_digest(acc, trainer.model)], use_gather_object=True)
    results = trainer.write_results(args.out, rank_digests=digests)
    release_engine(acc)
    acc.end_training()
    for name, r in results["tasks"].items():
        acc.print(f"{name}: best epoch {r['best_epoch']}, val perplexity {r['best_val_ppl']}; plugin: "
                  f"{Path(cfgs[name].output_dir) / 'plugin'}")
    return results


if __name__ == "__main__":
    run_cli(main)
