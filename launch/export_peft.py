"""Export one context group of a LoRA plugin as a Hugging Face PEFT LoRA adapter folder.

    python launch/export_peft.py --plugin runs/caption_offline/plugin --context text --out runs/caption_text_peft
    python launch/export_peft.py --plugin runs/unified/plugin --context qa.answer --out DIR --base-model HF_ID

The folder (adapter_config.json + adapter_model.safetensors) loads with
``peft.PeftModel.from_pretrained(base_lm, DIR)`` and computes what the plugin's model computes when every token
takes that context (see mtcpeft/plugins/peft.py). The projector of an image plugin is not part of a PEFT adapter.
An existing --out is replaced only if it holds a PEFT adapter and --overwrite is given.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
from pathlib import Path

from mtcpeft.cli import run_cli
from mtcpeft.io import check_output_dir
from mtcpeft.plugins.peft import PEFT_CONFIG, PEFT_WEIGHTS, export_peft


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", required=True, help="a LoRA plugin directory (task or unified)")
    ap.add_argument("--context", required=True, help="the context group to export, e.g. text or qa.answer")
    ap.add_argument("--out", required=True, help="output PEFT adapter folder")
    ap.add_argument("--base-model", help="base_model_name_or_path to record (default: the plugin's base_lm)")
    ap.add_argument("--overwrite", action="store_true", help="replace the PEFT adapter already in --out")
    args = ap.parse_args(argv)
    check_output_dir(args.out, (PEFT_CONFIG, PEFT_WEIGHTS), overwrite=args.overwrite, what="PEFT adapter")
    out = export_peft(args.plugin, args.context, args.out, base_model_name_or_path=args.base_model)
    print(f"PEFT adapter: {out} (context {args.context!r} of {args.plugin})")
    return out


if __name__ == "__main__":
    run_cli(main)
