"""ClinKD's VG scorer restated from clinkd-spec §3.7 without clinkd_jax's code, so the tests that throw any answer
at the evaluation compare against the protocol rather than against the implementation under test."""

import re

MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")  # x_ray--... -> "x"


def extract_information(text: str) -> str:
    """§3.6, in its order."""
    if ".<|im_end|>" in text:
        text = text.split(".<|im_end|>")[0] + "."
    text = text.replace("<|im_end|>\n", "")
    m = re.search(r"\n(.*?)\n", text, re.S)
    if m:
        text = m.group(1)
    return text.replace("<|endoftext|>", "").strip()


def _floats(s: str):
    try:
        v = [float(x) for x in s.replace("(", "").replace(")", "").split(",")]
    except ValueError:
        return None
    return v if len(v) == 4 else None


def _iou(p, g) -> float:
    """Areas (x2-x1)(y2-y1) as written, no +1, no reordering; an unparsable box: 0."""
    if p is None:
        return 0.0
    inter = max(0.0, min(p[2], g[2]) - max(p[0], g[0])) * max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    return inter / union if inter > 0 else 0.0  # inter > 0 needs both boxes ordered there, so union > 0


def hits(annotation: str, response: str) -> tuple[int, int]:
    """(reference boxes hit at IoU > 0.5, reference boxes): predicted boxes are `<box>(.*?)</box>` of the processed
    response, else every `(d+,d+),(d+,d+)`; one prediction may hit several references."""
    text = extract_information(response)
    preds = re.findall(r"<box>(.*?)</box>", text) or re.findall(r"\(\d+,\d+\),\(\d+,\d+\)", text)
    refs = [_floats(b) for b in re.findall(r"<box>(.*?)</box>", annotation)]
    return sum(any(_iou(_floats(p), g) > 0.5 for p in preds) for g in refs), len(refs)


def vg_recall(predictions) -> float:
    """The 8-modality mean of per-modality hits / (reference boxes + 1e-8); a modality without items counts 0."""
    got, total = {}, {}
    for p in predictions:
        h, n = hits(p["annotation"], p["response"])
        if n:
            m = p["image"].split("/")[-1].split("_")[0].lower()  # the prefix before the first underscore
            got[m], total[m] = got.get(m, 0) + h, total.get(m, 0) + n
    return sum(got[m] / (total[m] + 1e-8) for m in total if m in MODALITIES) / len(MODALITIES)
