"""``launch/train_fused.py`` with qa's training labels blanked on rank 1 (run under ``accelerate launch`` by
tests/training/test_fused.py): every step then holds a qa batch without label tokens on that rank."""
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[2]


class NoLabels(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["labels"] = torch.full_like(item["labels"], -100)
        return item


def main() -> None:
    spec = importlib.util.spec_from_file_location("launch_train_fused", ROOT / "launch" / "train_fused.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    build = script.fused_data

    def fused_data(*args, **kwargs):
        data = build(*args, **kwargs)
        if os.environ.get("RANK") == "1":
            train, val = data["qa"]
            data["qa"] = (NoLabels(train), val)
        return data

    script.fused_data = fused_data
    script.main(sys.argv[1:])


if __name__ == "__main__":
    main()
