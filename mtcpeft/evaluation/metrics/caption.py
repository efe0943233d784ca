"""Caption metrics of the COCO caption evaluation (Chen et al., 2015, arXiv 1504.00325): BLEU-1..4 (Papineni et
al., 2002) and CIDEr-D (Vedantam et al., 2015, arXiv 1411.5726), against all references of each image.

The scores come from the ``pycocoevalcap`` package's own Bleu and Cider scorers (pure Python), so they are the
coco-caption numbers: BLEU is corpus-level, its brevity penalty uses for each candidate the reference length
closest to it; CIDEr-D uses n = 1..4 with equal weights, document frequencies from the references of the
evaluated set, clipped tf-idf vectors, a Gaussian length penalty with sigma 6, and is scaled by 10.

Tokenisation: coco-caption runs the Stanford PTB tokenizer (Java) and drops punctuation tokens. Java is not
available here, so :func:`tokenize` stands in for it in pure Python: lower case, clitics split off as PTB does
("dog's" -> "dog 's", "don't" -> "do n't"), numbers like "3.5" and hyphenated words kept whole, punctuation
dropped. On ordinary captions the tokens are the same; rare cases (brackets, odd symbols) can differ.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Hashable, Mapping, Sequence

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"\d+(?:[.,:]\d+)+|n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-'][^\W_]+)*|\S")
# the punctuation tokens coco-caption removes after PTB tokenisation, plus the raw characters PTB rewrites into
# them (quotes -> `` '', brackets -> -LRB- ...)
_PUNCT = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")", "[", "]",
                    "{", "}"})


def tokenize(text: str) -> list[str]:
    """``"A man's T-shirt, 3.5 feet (tall)!"`` -> ``["a", "man", "'s", "t-shirt", "3.5", "feet", "tall"]``."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    return [t for t in _TOKEN.findall(text) if t not in _PUNCT]


def _tokenized(texts: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    return {k: [" ".join(tokenize(t)) for t in v] for k, v in texts.items()}


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr-D of ``predictions`` {image id: caption} against ``references`` {image id: [captions]}.

    Returns ``{"bleu4"}`` in [0, 1], ``"bleu"`` [BLEU-1, ..., BLEU-4], ``"cider"`` (CIDEr-D on its usual scale,
    0..10; a strong COCO model scores about 1.2, which papers print as 120), ``"count"`` and ``"per_example"``
    {id: {"bleu4", "cider"}} (sentence-level BLEU-4 with its own brevity penalty). Every referenced id needs a
    prediction: the metrics are corpus-level, so a missing one would change the others' scores. CIDEr-D's idf
    comes from the evaluated images, so it is 0 for every candidate when only one image is scored.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not references:
        raise ValueError("no references given; score at least one image (CIDEr-D needs two for a non-zero idf)")
    missing = [k for k in references if k not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} of {len(references)} images (first: {missing[0]!r}); "
                       "caption metrics are corpus-level, so generate a caption for every image")
    empty = [k for k, v in references.items() if isinstance(v, str) or not v]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference list; give each image a list of reference captions")
    gts = _tokenized(references)
    res = _tokenized({k: [predictions[k] or ""] for k in references})
    with contextlib.redirect_stdout(io.StringIO()):  # the scorer prints its n-gram counts
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        cider, cider_per = Cider().compute_score(gts, res)
    ids = list(gts)
    return {"bleu4": float(bleu[3]), "bleu": [float(b) for b in bleu], "cider": float(cider), "count": len(ids),
            "per_example": {k: {"bleu4": float(bleu_per[3][i]), "cider": float(cider_per[i])}
                            for i, k in enumerate(ids)}}


def bleu4(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] (see :func:`caption_scores`)."""
    return caption_scores(predictions, references)["bleu4"]


def cider_d(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D, usual scale (see :func:`caption_scores`)."""
    return caption_scores(predictions, references)["cider"]
