"""Train one task's context adaptors (and projector) and leave a plugin behind.

    accelerate launch launch/train_task.py --task caption                  # the offline default config
    accelerate launch launch/train_task.py --task qa                       # configs/qa_offline.yaml
    python launch/train_task.py --task caption --config configs/paper/swin_tiny_lora.yaml adaptor.rank=8
    accelerate launch launch/train_task.py --task caption train.resume=true   # continue an interrupted run
    python launch/train_task.py --task qa data.source=hf data.hf_path=rajpurkar/squad data.streaming=true \
        train.max_steps=1000 data.val_limit=500                                 # stream the split while training

Positional ``key=value`` arguments override the YAML (``train.lr=3e-4``). Output directory: checkpoint/
(atomic, resumable), plugin/ (adaptor.safetensors + plugin.json of the best validation), config.yaml,
results.json and tensorboard events under tb/. An output_dir that holds a previous run is refused unless the
run resumes it (train.resume=true) or replaces it (--overwrite; files mtcpeft did not write are kept). A task of your
own package: --task-module mypkg.mytask (see mtcpeft/data/task.py).
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli, task_help
from mtcpeft.config import load_config
from mtcpeft.data.task import get_task, offline_config
from mtcpeft.training.build import build_task_model, task_plugin
from mtcpeft.training.run import end_run, fit_run, run_results, start_run
from mtcpeft.training.streams import build_run_data
from mtcpeft.training.trainer import make_accelerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help=task_help())
    ap.add_argument("--config", help="YAML config (default: configs/<task>_offline.yaml)")
    ap.add_argument("--overwrite", action="store_true", help="replace the previous run in output_dir (its plugin, "
                    "checkpoint and results; other files are kept)")
    add_task_module_option(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 adaptor.kind=bitfit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_task_modules(args)
    task = get_task(args.task)
    default = offline_config(task.name)
    cfg = load_config(args.config or (default if default.is_file() else None), args.overrides)
    cfg.task = task.name
    start_run(cfg, args.overwrite)
    model, tokenizer, layout = build_task_model(cfg, task)  # before the Accelerator (see mtcpeft/training/run.py)
    acc = make_accelerator(cfg.train, cfg.output_dir)
    with acc.main_process_first():  # data.streaming: the training split is read while training, not here
        train, val, reports = build_run_data(cfg, task, model, tokenizer, layout, acc.process_index,
                                             acc.num_processes, progress=acc.is_local_main_process)
    for split, report in reports.items():
        if split != "train" or not cfg.data.streaming:
            acc.print(report.summary(split))
    trainer, state = fit_run(cfg, model, train, val, acc, lambda m, out, tensors: task_plugin(m, cfg, task, out, tensors))
    trainer.finish()
    if cfg.data.streaming:  # what the stream dropped, as read by this process
        acc.print(reports["train"].summary("train (streamed, process 0)"))
    results = {"task": task.name, **run_results(trainer, state),
               "data": {s: vars(r) | {"bad_images": len(r.bad_images)} for s, r in reports.items()}}
    end_run(acc, results, cfg.output_dir, state)
    return results


if __name__ == "__main__":
    run_cli(main)
