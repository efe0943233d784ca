"""Train one task's context adaptors (and projector) and leave a plugin behind.

    accelerate launch launch/train_task.py --task caption                  # the offline default config
    accelerate launch launch/train_task.py --task qa                       # configs/qa_offline.yaml
    python launch/train_task.py --task caption --config configs/paper/swin_tiny_lora.yaml adaptor.rank=8
    accelerate launch launch/train_task.py --task caption train.resume=true   # continue an interrupted run

Positional ``key=value`` arguments override the YAML (``train.lr=3e-4``). Output directory: checkpoint/
(atomic, resumable), plugin/ (adaptor.safetensors + plugin.json of the best validation), config.yaml,
results.json and tensorboard events under tb/. An output_dir that holds a previous run is refused unless the
run resumes it (train.resume=true) or replaces it (--overwrite; files mtcpeft did not write are kept).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a fresh clone works without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from accelerate.utils import set_seed  # noqa: E402

from mtcpeft.cli import run_cli  # noqa: E402
from mtcpeft.config import load_config  # noqa: E402
from mtcpeft.io import prepare_run_dir, write_json  # noqa: E402
from mtcpeft.training.build import build_task_model, build_datasets, task_plugin  # noqa: E402
from mtcpeft.training.trainer import Trainer, configure_cpu_threads, make_accelerator  # noqa: E402
from tasks import TASKS, get_task  # noqa: E402


def default_config(task: str) -> Path | None:
    path = ROOT / "configs" / f"{task}_offline.yaml"
    return path if path.is_file() else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help=f"registered task: {', '.join(TASKS.names())}")
    ap.add_argument("--config", help="YAML config (default: configs/<task>_offline.yaml)")
    ap.add_argument("--overwrite", action="store_true", help="replace the previous run in output_dir (its plugin, "
                    "checkpoint and results; other files are kept)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 adaptor.kind=bitfit")
    args = ap.parse_args(argv)
    task = get_task(args.task)
    cfg = load_config(args.config or default_config(args.task), args.overrides)
    cfg.task = task.name
    # before anything is built: a bad output_dir must not cost a model load and an encoding of every image
    prepare_run_dir(cfg.output_dir, resume=cfg.train.resume, overwrite=args.overwrite,
                    check_only=os.environ.get("RANK", "0") != "0")

    set_seed(cfg.seed)  # the model's trainable initialisation (projector, LoRA A) is part of the run's seed
    configure_cpu_threads()
    # built before the Accelerator: under ZeRO-3 transformers would otherwise load the LM already partitioned
    model, tokenizer, layout = build_task_model(cfg, task)
    acc = make_accelerator(cfg.train, cfg.output_dir)
    with acc.main_process_first():
        data = build_datasets(cfg, task, model, tokenizer, layout, progress=acc.is_local_main_process)
    for split, (_, report) in data.items():
        acc.print(report.summary(split))
    out = Path(cfg.output_dir)

    def save_best(trainer: Trainer) -> None:
        state = trainer.acc.get_state_dict(trainer.model)  # gathers ZeRO-3 shards; every rank must call it
        if trainer.acc.is_main_process:
            task_plugin(trainer.acc.unwrap_model(trainer.model), cfg, task, out / "plugin", state)

    trainer = Trainer(cfg, model, data["train"][0], data["val"][0], accelerator=acc, on_best=save_best)
    state = trainer.fit()
    trainer.finish()
    results = {
        "task": task.name, "best_epoch": state.best_epoch, "best_val_ppl": state.best_val_ppl,
        "history": state.history, "trainable_parameters": trainer.num_trainable,
        "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
        "data": {s: vars(r) | {"bad_images": len(r.bad_images)} for s, (_, r) in data.items()},
    }
    if acc.is_main_process:
        write_json(results, out / "results.json")
        acc.print(f"best epoch {state.best_epoch}: val perplexity {state.best_val_ppl:.3f}; plugin: {out / 'plugin'}"
                  if state.best_val_ppl is not None else "no validation: no plugin written")
    return results


if __name__ == "__main__":
    run_cli(main)
