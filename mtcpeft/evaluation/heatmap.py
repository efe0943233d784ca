"""Where caption words look in the image: attention of a caption span's tokens over the image tokens, as a
heatmap on the image (Context-PEFT, arXiv 2312.08900, section 4.5).

The prompt of a task plugin ([BOS] + image tokens) is followed by a given text as if the model had generated it
(teacher forcing: its tokens take the task's generated context). One forward returns every layer's attention
probabilities (B, heads, S, S); :func:`image_attention` keeps the rows of the span's tokens and the columns of the
image tokens, sums them over those queries and the heads, and lays the T image tokens out on the encoder's
(grid_h, grid_w) patch grid (row-major, as :class:`mtcpeft.models.vision.VisionEncoder` flattens them).
:func:`overlay` upsamples that map (bilinear) onto the picture.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from mtcpeft.errors import MtcpeftError


class HeatmapError(MtcpeftError, ValueError):
    """The text, span, layer or model cannot give an attention map; the message says what to change."""


# ------------------------------------------------------------------------------------------ pure functions
def image_attention(attn: torch.Tensor, query_positions: Sequence[int], image_positions: Sequence[int],
                    grid: tuple[int, int], heads: Sequence[int] | None = None, normalise: bool = True) -> torch.Tensor:
    """The (grid_h, grid_w) map of attention mass that ``query_positions`` give to each image token.

    ``attn``: (heads, S, S) or (1, heads, S, S) attention probabilities (rows: queries, columns: keys). The mass
    is summed over the query rows and over ``heads`` (default all); image token k goes to cell (k // grid_w,
    k % grid_w). ``normalise``: rescale to [0, 1] as (m - min) / (max - min) (a constant map becomes zeros);
    otherwise the summed mass itself.
    """
    if attn.ndim == 4:
        if attn.shape[0] != 1:
            raise HeatmapError(f"attention of a batch of {attn.shape[0]}: pass one sequence (1, heads, S, S)")
        attn = attn[0]
    if attn.ndim != 3 or attn.shape[-1] != attn.shape[-2]:
        raise HeatmapError(f"expected attention (heads, S, S), got shape {tuple(attn.shape)}")
    gh, gw = grid
    if len(image_positions) != gh * gw:
        raise HeatmapError(f"{len(image_positions)} image tokens do not fill a {gh}x{gw} grid")
    if not query_positions:
        raise HeatmapError("no query positions: the span has no tokens")
    if heads is not None:
        attn = attn[list(heads)]
    rows = attn[:, list(query_positions)]  # (heads, Q, S)
    mass = rows[..., list(image_positions)].float().sum(dim=(0, 1))  # (T,)
    heat = mass.reshape(gh, gw)
    if not normalise:
        return heat
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def sublist_index(haystack: Sequence[int], needle: Sequence[int]) -> int | None:
    """First index where ``needle`` occurs as a contiguous run in ``haystack``, or None."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if n and list(haystack[i:i + n]) == list(needle):
            return i
    return None


def span_positions(tokenizer, text: str, span: str) -> tuple[list[int], list[int]]:
    """(the text's token ids, positions of the span's tokens among them). The span is tokenized alone and with a
    leading space (BPE vocabularies spell a word inside a sentence as " word") and looked up in the text's tokens."""
    if not span.strip():
        raise HeatmapError("the span is empty: pass --span with words of the text")
    if span not in text:
        raise HeatmapError(f"span {span!r} is not in the text {text!r}; pass words that occur in --text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for variant in (span, " " + span.lstrip()):
        needle = tokenizer(variant, add_special_tokens=False)["input_ids"]
        start = sublist_index(ids, needle)
        if start is not None:
            return ids, list(range(start, start + len(needle)))
    pieces = [tokenizer.decode([i]) for i in ids]
    raise HeatmapError(f"span {span!r} does not fall on token boundaries of {text!r} (its tokens: {pieces}); "
                       "choose whole tokens, e.g. whole words")


def encoder_grid(encoder, num_tokens: int) -> tuple[int, int]:
    """The encoder's patch grid, or sqrt(T) x sqrt(T) when it does not declare one that holds T tokens."""
    grid = tuple(getattr(encoder, "grid", ()) or ())
    if len(grid) == 2 and grid[0] * grid[1] == num_tokens:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise HeatmapError(f"cannot lay {num_tokens} image tokens on a square grid and the encoder declares none")
    return side, side


# ------------------------------------------------------------------------------------------- the model
@contextmanager
def eager_attention(lm) -> Iterator[None]:
    """Run the block with the eager attention kernel (sdpa / flash kernels return no weights), then restore.
    Uses transformers' ``set_attn_implementation`` when the model has it, else the config attribute."""
    config = lm.config
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return

    def use(impl: str) -> None:
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation(impl)
        else:
            config._attn_implementation = impl

    use("eager")
    try:
        yield
    finally:
        use(before)


@dataclass
class SpanAttention:
    """One layer's attention for a prompt + text, and where the span and the image sit in the sequence."""

    attn: torch.Tensor  # (heads, S, S) probabilities
    query_positions: list[int]  # the span's tokens
    image_positions: list[int]  # the image tokens, in the encoder's order
    grid: tuple[int, int]  # (grid_h, grid_w)
    span_tokens: list[str]

    def map(self, heads: Sequence[int] | None = None) -> torch.Tensor:
        return image_attention(self.attn, self.query_positions, self.image_positions, self.grid, heads)


@torch.no_grad()
def span_attention(model, tokenizer, layout, task, manifest, image: Image.Image, text: str, span: str,
                   layer: int, question: str | None = None) -> SpanAttention:
    """Teacher-force ``text`` after the plugin's prompt for ``image`` (and ``question``, VQA) and return
    ``layer``'s attention.

    ``model``, ``tokenizer``, ``layout``, ``task``, ``manifest``: as :func:`mtcpeft.plugins.load.load_model` returns
    them (``Loaded.model``, ...).
    """
    from mtcpeft.models.vision import image_transform
    from mtcpeft.plugins.merge import route_map

    if not task.uses_images or model.encoder is None:
        raise HeatmapError(f"the {task.name} plugin takes no image: heatmaps need an image task (caption)")
    text_ids, span_pos = span_positions(tokenizer, text, span)
    prompt = task.prompt({"image": None, "question": question or ""}, tokenizer, layout)
    gen = task.vocab.id(task.generated_context)
    ids = prompt["input_ids"] + text_ids
    ctx = torch.tensor([prompt["context_ids"] + [gen] * len(text_ids)])
    ctx = route_map(manifest, task.name, task.contexts)[ctx + 1]  # context-agnostic plugins: one shared group
    image_mask = prompt["image_mask"] + [False] * len(text_ids)
    pixels = image_transform(model.encoder, train=False, augment=False)(image).unsqueeze(0)
    lm = model.lm.model
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and len(ids) > limit:
        raise HeatmapError(f"prompt + text take {len(ids)} tokens, the LM holds {limit}; shorten --text")
    with eager_attention(lm):
        out = model(input_ids=torch.tensor([ids]), context_ids=ctx, image_mask=torch.tensor([image_mask]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long), pixel_values=pixels,
                    output_attentions=True)
    layers = out.attentions or ()
    if not layers or layers[0] is None:
        raise HeatmapError(f"{type(lm).__name__} returned no attention weights even with eager attention")
    if not -len(layers) <= layer < len(layers):
        raise HeatmapError(f"layer {layer} does not exist: the LM has {len(layers)} layers (0..{len(layers) - 1}, "
                           "or -1 for the last)")
    image_pos = [i for i, m in enumerate(image_mask) if m]
    start = len(prompt["input_ids"])
    return SpanAttention(layers[layer][0].float(), [start + p for p in span_pos], image_pos,
                         encoder_grid(model.encoder, len(image_pos)),
                         [tokenizer.decode([text_ids[p]]) for p in span_pos])


# ------------------------------------------------------------------------------------------------ images
def crop_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred square of an image of ``size`` (w, h) that the encoder's eval transform keeps (it resizes
    the short side and centre-crops): (left, top, right, bottom)."""
    w, h = size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """``image`` (RGB, any size) with ``heat`` (grid_h, grid_w) in [0, 1] upsampled bilinearly onto the region the
    encoder saw, coloured by the matplotlib colour map ``cmap`` and blended with weight ``alpha``."""
    from matplotlib import colormaps

    image = image.convert("RGB")
    left, top, right, bottom = crop_box(image.size)
    up = F.interpolate(heat[None, None].float(), size=(bottom - top, right - left), mode="bilinear",
                       align_corners=False)[0, 0].clamp(0, 1)
    rgb = (colormaps[cmap](up.numpy())[..., :3] * 255).round().astype("uint8")
    coloured = image.copy()
    coloured.paste(Image.fromarray(rgb), (left, top))
    return Image.blend(image, coloured, alpha)


def save_head_panels(image: Image.Image, panels: Sequence[tuple[str, torch.Tensor]], path: str | Path,
                     title: str = "", alpha: float = 0.5) -> Path:
    """A grid of overlays (all heads first, then one per head), each titled, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtcpeft.io import atomic_path

    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.4), squeeze=False, dpi=100)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, heat) in zip(axes.flat, panels):
        ax.imshow(overlay(image, heat, alpha))
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
