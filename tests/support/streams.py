"""Tiny local datasets written by ``datasets`` itself, split over several files (the shards of a stream), for the
streaming tests: captions with images as bytes in parquet, SQuAD-schema QA rows in parquet, VQA rows in an
imagefolder with metadata.jsonl."""
from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
RGB = {"red": (200, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 200), "yellow": (200, 200, 10),
       "white": (250, 250, 250), "black": (5, 5, 5)}


def png(rgb, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _shards(rows: dict, n_files: int) -> list[dict]:
    return [{k: v[i::n_files] for k, v in rows.items()} for i in range(n_files)]


def caption_parquets(root: Path, n: int = 12, n_files: int = 2, bad_rows: tuple[int, ...] = ()) -> Path:
    """``n`` images (16 px, colour by row) with one or two captions each, in ``n_files`` parquet files; rows of
    ``bad_rows`` hold bytes that are not an image. Returns the folder (its split "train" is every file)."""
    folder = root / "captions"
    folder.mkdir(parents=True)
    colours = [COLOURS[i % len(COLOURS)] for i in range(n)]
    images = [{"bytes": b"not an image" if i in bad_rows else png(tuple((c + 7 * i) % 256 for c in RGB[colour])),
               "path": None} for i, colour in enumerate(colours)]
    captions = [[f"a {c} square number {i}"] + ([f"square {i} is {c}"] if i % 2 else []) for i, c in enumerate(colours)]
    rows = {"image": images, "captions": captions, "image_id": list(range(n))}
    for i, part in enumerate(_shards(rows, n_files)):
        ds = datasets.Dataset.from_dict(part).cast_column("image", datasets.Image())
        ds.to_parquet(folder / f"train-{i:05d}-of-{n_files:05d}.parquet")
    return folder


def qa_parquets(root: Path, n: int = 24, n_files: int = 4) -> Path:
    """``n`` SQuAD-schema rows (each answer at its answer_start), in ``n_files`` parquet files."""
    folder = root / "qa"
    folder.mkdir(parents=True)
    rows = {"id": [], "context": [], "question": [], "answers": []}
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        context = f"box {i} is {colour} and box {i + 1} is {COLOURS[(i + 1) % len(COLOURS)]}."
        rows["id"].append(f"q{i}")
        rows["context"].append(context)
        rows["question"].append(f"what colour is box {i}?")
        rows["answers"].append({"text": [colour], "answer_start": [context.index(colour)]})
    for i, part in enumerate(_shards(rows, n_files)):
        datasets.Dataset.from_dict(part).to_parquet(folder / f"train-{i:05d}.parquet")
    return folder


def vqa_imagefolder(root: Path, n: int = 8) -> Path:
    """An imagefolder of ``n`` images with VQA rows (question, answers, multiple_choice_answer) in metadata.jsonl."""
    folder = root / "vqa"
    folder.mkdir(parents=True)
    meta = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        (folder / f"{i}.png").write_bytes(png(RGB[colour]))
        meta.append({"file_name": f"{i}.png", "question_id": i, "image_id": i,
                     "question": f"what colour is picture {i}?", "answers": [colour, colour, "grey"],
                     "multiple_choice_answer": colour})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return folder
