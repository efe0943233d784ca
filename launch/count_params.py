"""Count the trainable parameters a context adaptor adds to an LM backbone.

    python launch/count_params.py --model smollm2 --adaptor lora --rank 64 --targets AF --contexts image,text
    python launch/count_params.py --model smollm2 --adaptor lora --rank 64 --context-agnostic --json
    python launch/count_params.py --model path/to/config.json --adaptor ia3 --targets AF --random-init
    python launch/count_params.py --table --model paper-llm
    python launch/count_params.py --model smollm2 --mode full --random-init   # full fine-tuning (train.mode=full)

``--model`` takes what :func:`mtcpeft.models.load_lm` takes (hub id, folder, .gguf, ``smollm2``, config.json),
or ``paper-llm``: the Context-PEFT paper's own LLM built from its configuration (it has no public weights).
``--table`` prints one markdown table instead: IA3, BitFit, LoRA-1/8/64 in the ``--targets`` placement,
context-agnostic and context-specific (``--contexts``), and full fine-tuning, each with its percent of the LM's
parameters; it always builds on the meta device (instant).
``--mode full`` counts full fine-tuning instead of an adaptor: every LM weight that trains with ``train.mode=full``.
``--random-init`` builds the model from its configuration on the meta device (instant, no weights read); the
count is the same as with the real weights. Also runs under ``accelerate launch``.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
import contextlib
import json
import os
import sys

from mtcpeft.cli import run_cli
from mtcpeft.config import TRAIN_MODES, ConfigError
from mtcpeft.core.adaptors import ADAPTORS, adaptor_config
from mtcpeft.experiments.params import AGNOSTIC, build_lm, count_for, count_full, markdown_table, param_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="hub id, folder, .gguf, 'smollm2', 'paper-llm' or config.json")
    p.add_argument("--adaptor", default="lora", choices=ADAPTORS.names(), help="adaptor kind")
    p.add_argument("--mode", default="adaptors", choices=TRAIN_MODES,
                   help="what trains, as train.mode: the adaptor, or every LM weight (full; ignores --adaptor)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the LoRA config's)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--targets", default="AF", help="A, F, AF or comma-separated module-name patterns")
    p.add_argument("--contexts", default="image,text", help="comma-separated context names")
    p.add_argument("--context-agnostic", action="store_true", help="one shared group (ignores --contexts)")
    p.add_argument("--random-init", action="store_true", help="build from the config on the meta device")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", action="store_true",
                   help="markdown table of IA3, BitFit, LoRA-1/8/64 and full fine-tuning (ignores --adaptor/--rank)")
    return p.parse_args(argv)


def adaptor_options(args: argparse.Namespace) -> dict:
    """--rank/--alpha for the kinds that have them; naming them for another kind is an error."""
    given = {k: v for k, v in (("rank", args.rank), ("alpha", args.alpha)) if v is not None}
    fields = ADAPTORS.get(args.adaptor).__dataclass_fields__
    extra = sorted(k for k in given if k not in fields)
    if extra:
        flags = ", ".join(f"--{k}" for k in extra)
        raise ConfigError(f"the {args.adaptor!r} adaptor has no {flags} option (options: {', '.join(fields)})")
    return given


def table(args: argparse.Namespace) -> dict:
    """--table: every compared method on fresh meta-device copies of the LM."""
    contexts = [c.strip() for c in args.contexts.split(",") if c.strip()]
    if len(contexts) < 2:
        raise ConfigError(f"the context-specific column needs two contexts or more, got {contexts}; "
                          "pass --contexts a,b")
    with contextlib.redirect_stdout(sys.stderr):  # a wrong --model or --targets: run_cli prints the fix
        rows = param_table(lambda: build_lm(args.model, random_init=True), contexts, args.targets)
    result = {
        "model": args.model,
        "targets": args.targets,
        "contexts": contexts,
        "total_lm": rows[0].agnostic.total_lm,
        "rows": [
            {"method": r.method, "agnostic": r.agnostic.trainable, "specific": r.specific.trainable,
             "agnostic_percent": round(r.agnostic.percent, 4), "specific_percent": round(r.specific.percent, 4)}
            for r in rows
        ],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result) if args.json else markdown_table(rows, contexts))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        return table(args)
    full = args.mode == "full"
    config = adaptor_config("none" if full else args.adaptor, **({} if full else adaptor_options(args)))
    contexts = [AGNOSTIC] if args.context_agnostic else [c.strip() for c in args.contexts.split(",") if c.strip()]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report (libraries log there)
        if full:
            count = count_full(build_lm(args.model, random_init=args.random_init))
        else:
            count = count_for(args.model, config, contexts, args.targets, random_init=args.random_init)
    result = {
        "model": args.model,
        "mode": args.mode,
        "adaptor": None if full else args.adaptor,
        "rank": getattr(config, "rank", None),
        "targets": args.targets,
        "contexts": contexts,
        "trainable": count.trainable,
        "total_lm": count.total_lm,
        "percent": round(count.percent, 4),
    }
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`: one report, from the main process
        return result
    if args.json:
        print(json.dumps(result))
        return result
    adaptor = "full fine-tuning (train.mode=full)" if full else args.adaptor
    if hasattr(config, "rank"):
        adaptor += f" (rank {config.rank}, alpha {config.alpha:g})"
    rows = [
        ("model", args.model + (" (random init)" if args.random_init else "")),
        ("adaptor", adaptor),
        ("targets", "every LM weight" if full else args.targets),
        ("contexts", "-" if full else ", ".join(contexts) + (" (context-agnostic)" if args.context_agnostic else "")),
        ("trainable", f"{count.trainable:>15,}"),
        ("total LM", f"{count.total_lm:>15,}"),
        ("percent", f"{count.percent:>14.4f}%"),
    ]
    for key, value in rows:
        print(f"{key:<10} {value}")
    return result


if __name__ == "__main__":
    run_cli(main)
