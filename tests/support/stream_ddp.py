"""A streaming qa run under ``accelerate launch`` (tests/training/test_streaming_train.py): each process writes
``<out>/rank<r>.json`` with the world size, the training examples its batches held (input ids), its trainable
digest and whether it read only its own shards.

    accelerate launch ... tests/support/stream_ddp.py LM_DIR DATA_FOLDER OUT [key=value ...]
"""
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import default_collate

from conftest import tiny_overrides
from mtcpeft.config import load_config
from mtcpeft.data.task import get_task
from mtcpeft.training.build import build_task_model
from mtcpeft.training.run import start_run
from mtcpeft.training.streams import build_run_data
from mtcpeft.training.trainer import Trainer, make_accelerator, trainable_digest


def main(lm_dir: str, folder: str, out: str, *overrides: str) -> None:
    cfg = load_config(None, [*tiny_overrides(lm_dir, out), "task=qa", "data.source=hf", f"data.hf_path={folder}",
                             "data.train_limit=null", "data.hf_val_split=train", "data.val_limit=4", "data.seq_len=96",
                             "data.streaming=true", "train.mixed_precision=no", *overrides])
    start_run(cfg)
    task = get_task("qa")
    model, tok, layout = build_task_model(cfg, task)
    acc = make_accelerator(cfg.train, cfg.output_dir, log=False)
    train, val, _ = build_run_data(cfg, task, model, tok, layout, acc.process_index, acc.num_processes, progress=False)
    seen = []

    def collate(items):
        if torch.is_grad_enabled():  # training batches (validation runs under no_grad)
            seen.extend(item["input_ids"].tolist() for item in items)
        return default_collate(items)

    trainer = Trainer(cfg, model, train, val, collate=collate, accelerator=acc)
    state = trainer.fit()
    result = {"world_size": acc.num_processes, "rank": acc.process_index, "seen": seen, "steps": state.global_step,
              "digest": trainable_digest(acc, trainer.model), "own_shards": train.own_shards(),
              "n_shards": train.n_shards}
    (Path(out) / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    trainer.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
