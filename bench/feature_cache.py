"""Per-epoch cost of the frozen vision encoder vs reading its cached features, on easy-VQA training images.

Run from the repository root::

    python bench/feature_cache.py   # N=256, batch 16, 3 epochs per mode; writes bench/RESULTS_feature_cache.md
    python bench/feature_cache.py --n 64 --epochs 2 --out ''   # quick look, writes nothing
    options: --encoder NAME --pretrained {packaged,none,PATH} --out-dim D --threads T

(a) live: every epoch, each batch of PIL images is transformed (eval transform), run through the frozen
    encoder under no_grad, then the trainable projector forward + backward + Adam step.
(b) cached: the encoder runs ONCE over the N images (``encode_images``, float16, timed separately, as the
    "one-time encode"); every epoch then stacks the cached (T, D) tensors of a batch and does the same projector
    forward + backward + step.
The loss is a dummy (mean square of the projected tokens): only the projector is trained here, no LM, so
the ratio is the upper bound of what caching saves; with the LM in the step the saving in seconds is the same,
the ratio smaller. Images are decoded into memory before timing in both cases. The first epoch of each mode is
a warm-up and is not counted; reported: the median of the remaining epochs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


from mtcpeft.io import atomic_path  # noqa: E402
from mtcpeft.models.projector import Projector  # noqa: E402
from mtcpeft.models.vision import build_vision_encoder, encode_images, image_transform  # noqa: E402

HEADING = "## Feature cache"


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="easy-VQA training images (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="epochs per mode, the first is a warm-up (default 3)")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--pretrained", default="packaged")
    p.add_argument("--out-dim", type=int, default=576, help="projector output width (SmolLM2-135M: 576)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--out", default="bench/RESULTS_feature_cache.md", help="markdown report; '' writes nothing")
    return p.parse_args()


def _step(projector: Projector, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    loss = projector(tokens).pow(2).mean()  # (B, T, out_dim) -> scalar
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _epoch_live(encoder, projector, opt, transform, images, bs) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(images), bs):
        pixels = torch.stack([transform(im) for im in images[i:i + bs]])  # (B, 3, H, W)
        _step(projector, opt, encoder(pixels))  # encoder: frozen, no_grad inside
    return time.perf_counter() - t0


def _epoch_cached(projector, opt, feats, keys, bs) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(keys), bs):
        _step(projector, opt, torch.stack([feats[k] for k in keys[i:i + bs]]))  # (B, T, D) float16
    return time.perf_counter() - t0


def _write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section in ``path`` (or add it), leaving anything else in the file alone."""
    text = path.read_text() if path.is_file() else "# Feature-cache benchmark results\n\n"
    if HEADING in text:
        head, rest = text.split(HEADING, 1)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) == 2 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from easy_vqa import get_train_image_paths
    from PIL import Image

    paths = sorted(get_train_image_paths().items())[: args.n]
    images = []
    for _, p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    keys = [k for k, _ in paths]

    encoder = build_vision_encoder(args.encoder, args.pretrained)
    transform = image_transform(encoder, train=False)
    print(f"{encoder.name}: {encoder.num_tokens} tokens x {encoder.dim} at {encoder.image_size} px; "
          f"N={len(images)}, batch {args.batch_size}, {args.threads} thread(s)")

    def fresh():
        torch.manual_seed(0)
        proj = Projector(encoder.dim, args.out_dim).train()
        return proj, torch.optim.Adam(proj.parameters(), lr=1e-4)

    proj, opt = fresh()
    live = [_epoch_live(encoder, proj, opt, transform, images, args.batch_size) for _ in range(args.epochs)]
    print("live epochs (s):", " ".join(f"{t:.2f}" for t in live))

    t0 = time.perf_counter()
    feats = encode_images(encoder, list(zip(keys, images)), batch_size=args.batch_size, progress=False)
    encode_s = time.perf_counter() - t0
    proj, opt = fresh()
    cached = [_epoch_cached(proj, opt, feats, keys, args.batch_size) for _ in range(args.epochs)]
    print("cached epochs (s):", " ".join(f"{t:.2f}" for t in cached), f"; one-time encode {encode_s:.2f} s")

    live_s, cached_s = statistics.median(live[1:] or live), statistics.median(cached[1:] or cached)
    ratio = live_s / cached_s
    break_even = encode_s / max(live_s - cached_s, 1e-9)
    mb = sum(f.numel() * f.element_size() for f in feats.values()) / 2**20
    print(f"per epoch: live {live_s:.2f} s, cached {cached_s:.3f} s -> {ratio:.1f}x; one-time encode {encode_s:.2f} s "
          f"(paid back after {break_even:.2f} epochs); cache {mb:.1f} MiB in float16")

    if args.out:
        cmd = "python bench/feature_cache.py " + " ".join(sys.argv[1:])
        section = (
            f"{HEADING}\n\n"
            f"`{cmd.strip()}` (OMP threads: {args.threads}; torch {torch.__version__}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at the end: other jobs shared the machine)\n\n"
            f"Encoder `{encoder.name}` ({args.pretrained}), {encoder.num_tokens} tokens x {encoder.dim} at "
            f"{encoder.image_size} px; N = {len(images)} easy-VQA train images, batch {args.batch_size}; "
            f"trainable linear projector {encoder.dim} -> {args.out_dim} (dropout 0.1) with Adam; no LM in the "
            f"step. Median of epochs 2..{args.epochs} (epoch 1 is warm-up).\n\n"
            "| | seconds |\n|---|---|\n"
            f"| (a) epoch, live encoder (transform + frozen encoder + projector fwd/bwd/step) | {live_s:.2f} |\n"
            f"| (b) epoch, cached features (stack + projector fwd/bwd/step) | {cached_s:.3f} |\n"
            f"| one-time encode of the N images (float16 cache, {mb:.1f} MiB) | {encode_s:.2f} |\n\n"
            f"Per-epoch speed-up: **{ratio:.1f}x**; the one-time encode is paid back after {break_even:.2f} "
            "epochs. Valid only with augmentation off (augmented images change every epoch). With the LM in the "
            "step the saving in seconds per epoch stays the same, the ratio is smaller.\n"
        )
        _write_section(Path(args.out), section)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
