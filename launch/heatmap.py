"""Attention heatmap of a caption span over the image (Context-PEFT, arXiv 2312.08900, section 4.5).

    python launch/heatmap.py --plugin runs/caption_offline/plugin --image path/to/image.png \
        --text "a red circle on a plain background." --span "red circle" --layer 10 --head-average
    python launch/heatmap.py --plugin DIR --image FILE --text "a blue triangle." --span triangle --layer -1 --out h.png

The text is fed after the plugin's prompt ([BOS] + image tokens) as if the model had generated it; layer N's
attention from the span's tokens to the image tokens is summed over those tokens and the heads, laid on the
encoder's patch grid, scaled to [0, 1] and blended onto the image. ``--head-average`` writes that one overlay, of
the image's size; without it the PNG is a panel grid: all heads, then each head on its own scale.
"""
from __future__ import annotations

if __name__ == "__main__":
    import _require_mtcpeft  # noqa: F401  (one `error:` line if mtcpeft is not installed)

import argparse
from pathlib import Path

import tasks  # noqa: F401  (registers the shipped tasks)
from mtcpeft.cli import add_task_module_option, load_task_modules, run_cli
from mtcpeft.config import ConfigError
from mtcpeft.data.dataset import open_image
from mtcpeft.evaluation.heatmap import overlay, save_head_panels, span_attention
from mtcpeft.io import atomic_path
from mtcpeft.plugins.load import load_model


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", required=True, help="plugin directory of an image task (launch/train_task.py)")
    ap.add_argument("--image", required=True, help="image file")
    ap.add_argument("--text", required=True, help="the caption, fed as if generated (teacher forcing)")
    ap.add_argument("--span", required=True, help="words of --text whose attention is shown, e.g. 'red circle'")
    ap.add_argument("--layer", type=int, required=True, help="LM layer, 0-based (negative counts from the last)")
    ap.add_argument("--out", default="heatmap.png", help="PNG to write (default: heatmap.png)")
    ap.add_argument("--head-average", action="store_true",
                    help="one overlay over all heads at the image's size (default: a panel per head as well)")
    ap.add_argument("--question", help="the question of a VQA plugin's prompt")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the heatmap in the blend (default 0.5)")
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    add_task_module_option(ap)
    args = ap.parse_args(argv)
    load_task_modules(args)
    if not Path(args.image).is_file():
        raise ConfigError(f"image {args.image} does not exist; pass an image file with --image")
    loaded = load_model(args.plugin, args.lm)
    image = open_image(args.image)
    sa = span_attention(loaded.model, loaded.tokenizer, loaded.layout, loaded.task, loaded.manifest, image, args.text,
                        args.span, args.layer, args.question)
    heat = sa.map()
    out = Path(args.out)
    if args.head_average:
        with atomic_path(out) as tmp:
            overlay(image, heat, args.alpha).save(tmp, format="PNG")
    else:
        panels = [("all heads", heat)] + [(f"head {h}", sa.map([h])) for h in range(sa.attn.shape[0])]
        title = f"layer {args.layer}: {args.span!r} in {args.text!r}"
        save_head_panels(image, panels, out, title, args.alpha)
    r, c = divmod(int(heat.argmax()), sa.grid[1])
    print(f"span tokens {sa.span_tokens} at positions {sa.query_positions}; {sa.grid[0]}x{sa.grid[1]} image grid, "
          f"most attended cell (row {r}, col {c}); wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
