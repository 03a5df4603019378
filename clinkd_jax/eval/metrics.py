"""Med-GRIT-270k scoring exactly as BiRD's and ClinKD's scripts do it (clinkd-spec §3.6–3.7).

Every quirk of the released scorers is kept on purpose, because papers compare numbers produced by
them: the kept bare `<|im_end|>`, the first-two-newlines rule, strict IoU > 0.5, predictions reused
across reference boxes, the integer fallback box parser, substring (not token) containment for ROC,
and the unweighted mean over all 8 modalities in which a modality without items counts 0.

A prediction is a dict in the BiRD/ClinKD JSONL format: {"id", "image", "question", "annotation",
"response"}; its modality is the image name's prefix before the first underscore.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from clinkd_jax.data.records import MODALITIES, modality_of

EPS = 1e-8
_BOX = re.compile(r"<box>(.*?)</box>")
_INT_BOX = re.compile(r"\(\d+,\d+\),\(\d+,\d+\)")
_BETWEEN_NEWLINES = re.compile(r"\n(.*?)\n", re.S)


def extract_information(text: str) -> str:
    """The released post-processing, in its order (spec §3.6)."""
    if ".<|im_end|>" in text:
        text = text.split(".<|im_end|>")[0] + "."
    text = text.replace("<|im_end|>\n", "")
    m = _BETWEEN_NEWLINES.search(text)
    if m:
        text = m.group(1)
    return text.replace("<|endoftext|>", "").strip()


def box_strings(annotation: str) -> list[str]:
    return _BOX.findall(annotation)


def predicted_box_strings(response: str) -> list[str]:
    """`<box>…</box>` bodies; if none, every `(d+,d+),(d+,d+)` (catches Qwen2-VL's <|box_start|> form)."""
    return _BOX.findall(response) or _INT_BOX.findall(response)


def to_floats(box: str) -> list[float] | None:
    """'(x1,y1),(x2,y2)' -> [x1, y1, x2, y2]; None when it does not parse (scored as IoU 0)."""
    try:
        values = [float(v) for v in box.replace("(", "").replace(")", "").split(",")]
    except ValueError:
        return None
    return values if len(values) == 4 else None


def iou(p: Sequence[float] | None, g: Sequence[float] | None) -> float:
    """Intersection over union with areas (x2-x1)(y2-y1), no +1; 0 for an unparsable box."""
    if p is None or g is None:
        return 0.0
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    return inter / union if union > 0 else 0.0


def per_modality_mean(values: dict[str, float]) -> float:
    """Unweighted mean over the 8 Med-GRIT modalities; a missing modality counts 0."""
    return sum(values.get(m, 0.0) for m in MODALITIES) / len(MODALITIES)


def vg_item_hits(annotation: str, response: str) -> tuple[int, int]:
    """(reference boxes hit at IoU > 0.5, reference boxes) for one item."""
    refs = [to_floats(b) for b in box_strings(annotation)]
    preds = [to_floats(b) for b in predicted_box_strings(extract_information(response))]
    hits = sum(any(iou(p, g) > 0.5 for p in preds) for g in refs)
    return hits, len(refs)


def vg_recall(predictions: Iterable[dict]) -> dict:
    """VG Recall@0.5 per modality and its 8-modality mean; items with no reference box are skipped."""
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    for p in predictions:
        h, n = vg_item_hits(p["annotation"], p["response"])
        if n == 0:
            continue
        m = modality_of(p["image"])
        hits[m] = hits.get(m, 0) + h
        total[m] = total.get(m, 0) + n
    per = {m: hits[m] / (total[m] + EPS) for m in total}
    return {"metric": "Recall@0.5", "per_modality": per, "count": total, "mean": per_modality_mean(per)}


def roc_correct(annotation: str, response: str) -> bool:
    """Every space-separated piece of the lower-cased annotation is a substring of the response."""
    response = extract_information(response).lower()
    return all(piece in response for piece in annotation.lower().split(" "))


def roc_accuracy(predictions: Iterable[dict]) -> dict:
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for p in predictions:
        m = modality_of(p["image"])
        correct[m] = correct.get(m, 0) + roc_correct(p["annotation"], p["response"])
        total[m] = total.get(m, 0) + 1
    per = {m: correct[m] / total[m] for m in total}
    return {"metric": "Accuracy", "per_modality": per, "count": total, "mean": per_modality_mean(per)}


# ------------------------------------------------------------------------------------ prediction files
PREDICTION_KEYS = ("id", "image", "question", "annotation", "response")


def read_predictions(path: str) -> list[dict]:
    """A BiRD/ClinKD prediction JSONL file; a bad line raises naming the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            missing = [k for k in PREDICTION_KEYS if k not in item]
            if missing:
                raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
            if isinstance(item["response"], list):  # the released script stores a decoded list; take its text
                item["response"] = "".join(map(str, item["response"]))
            out.append(item)
    return out
