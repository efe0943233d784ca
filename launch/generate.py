"""Caption an image with a trained captioning plugin (greedy, and beam search with --beams N > 1).

    python launch/generate.py --plugin runs/caption_offline/plugin --image path/to/image.png
    python launch/generate.py --plugin DIR --image a.png --image b.png --beams 4 --max-new-tokens 30
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mtcpeft.cli import run_cli  # noqa: E402
from mtcpeft.build import load_captioner  # noqa: E402
from mtcpeft.data.dataset import open_image  # noqa: E402
from mtcpeft.models.vision import image_transform  # noqa: E402
from tasks.caption import special_ids  # noqa: E402


def caption_images(model, tokenizer, layout, task, images: list[str], beams: int = 1, max_new_tokens: int = 40):
    """Captions of image files: a list of strings, in order."""
    prompt = task.prompt(tokenizer, layout)
    n = len(images)
    batch = {k: torch.tensor([v] * n, dtype=torch.bool if k == "image_mask" else torch.long) for k, v in prompt.items()}
    transform = image_transform(model.encoder, train=False, augment=False)
    pixels = torch.stack([transform(open_image(p)) for p in images])
    _, eos, pad = special_ids(tokenizer)
    out = model.generate(batch["input_ids"], batch["context_ids"], image_mask=batch["image_mask"],
                         attention_mask=batch["attention_mask"], pixel_values=pixels, num_beams=beams,
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", required=True, help="plugin directory written by launch/train_task.py")
    ap.add_argument("--image", required=True, action="append", help="image file (repeat for several)")
    ap.add_argument("--beams", type=int, default=1, help="beam search width (1 = greedy)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--lm", help="load the base LM from here instead of the plugin's base_lm")
    args = ap.parse_args(argv)
    for p in args.image:
        if not Path(p).is_file():
            ap.error(f"image {p} does not exist")
    model, tokenizer, layout, task, _ = load_captioner(args.plugin, lm=args.lm)
    caps = caption_images(model, tokenizer, layout, task, args.image, args.beams, args.max_new_tokens)
    for path, cap in zip(args.image, caps):
        print(f"{path}\t{cap}")
    return caps


if __name__ == "__main__":
    run_cli(main)
