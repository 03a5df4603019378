"""Semantic-Aware Selective Generation (SASG): from N sampled candidate answers keep the one with the
highest semantic score (clinkd-spec §2.5).

Two uses:
  * test time (optional, off in the released protocol): score = mean similarity to the other
    candidates (mutual agreement; the answer most candidates agree with);
  * training-time correction (Reflective Correction Training): score = similarity to the reference.

The similarity is pluggable: a name from SIMILARITIES or "module:function" taking (a, b) -> [0, 1].
The default, "overlap", needs no network and no model: for answers with boxes it is the mean of the
best-match IoU of the boxes and the ROUGE-L F1 of the remaining words; for text answers it is the
ROUGE-L F1 of the lower-cased words. This is our choice: the paper does not name its similarity model.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from clinkd_jax.eval.metrics import extract_information, iou, predicted_box_strings, to_floats

Similarity = Callable[[str, str], float]
_WORDS = re.compile(r"[a-z0-9]+")
_BOXES = re.compile(r"<\|box_start\|>.*?<\|box_end\|>|<box>.*?</box>|\(\d+,\d+\),\(\d+,\d+\)", re.S)
_TAGS = re.compile(r"<\|[a-z_]+\|>|</?(ref|box)>")


def words(text: str) -> list[str]:
    return _WORDS.findall(_TAGS.sub(" ", _BOXES.sub(" ", text)).lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 (β = 1) between the word sequences of a and b."""
    x, y = words(a), words(b)
    if not x or not y:
        return float(x == y)
    prev = [0] * (len(y) + 1)
    for xi in x:  # longest common subsequence, one row at a time
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def boxes(text: str) -> list:
    return [b for b in (to_floats(s) for s in predicted_box_strings(text)) if b is not None]


def box_agreement(a: str, b: str) -> float:
    """Symmetric best-match IoU: each box's best IoU with the other answer's boxes, averaged both ways."""
    ba, bb = boxes(a), boxes(b)
    if not ba or not bb:
        return float(not ba and not bb)
    one = sum(max(iou(p, g) for g in bb) for p in ba) / len(ba)
    two = sum(max(iou(p, g) for g in ba) for p in bb) / len(bb)
    return (one + two) / 2


def overlap(a: str, b: str) -> float:
    """The default similarity: box agreement and word overlap when either answer has boxes, else ROUGE-L."""
    a, b = extract_information(a), extract_information(b)
    if boxes(a) or boxes(b):
        return 0.5 * box_agreement(a, b) + 0.5 * rouge_l(a, b)
    return rouge_l(a, b)


SIMILARITIES: dict[str, Similarity] = {"overlap": overlap, "rouge_l": rouge_l, "box_iou": box_agreement}


def resolve(similarity: str | Similarity) -> Similarity:
    if callable(similarity):
        return similarity
    if similarity in SIMILARITIES:
        return SIMILARITIES[similarity]
    if ":" in similarity:
        module, name = similarity.split(":", 1)
        return getattr(importlib.import_module(module), name)
    raise ValueError(f"unknown similarity {similarity!r}: one of {sorted(SIMILARITIES)} or 'module:function'")


def scores(candidates: Sequence[str], reference: str | None = None,
           similarity: str | Similarity = "overlap") -> list[float]:
    """Similarity to the reference when given, else mean similarity to the other candidates."""
    sim = resolve(similarity)
    if reference is not None:
        return [sim(c, reference) for c in candidates]
    if len(candidates) == 1:
        return [1.0]
    out = []
    for i, c in enumerate(candidates):
        out.append(sum(sim(c, o) for j, o in enumerate(candidates) if j != i) / (len(candidates) - 1))
    return out


def select(candidates: Sequence[str], reference: str | None = None,
           similarity: str | Similarity = "overlap") -> tuple[int, list[float]]:
    """(index of the best candidate, all scores); ties go to the earliest candidate."""
    if not candidates:
        raise ValueError("SASG needs at least one candidate")
    s = scores(candidates, reference, similarity)
    return max(range(len(s)), key=lambda i: (s[i], -i)), s
