"""What a researcher reads after an evaluation: a Markdown table per task (one row per modality plus the
8-modality mean), a bar chart of per-modality scores, and an HTML gallery of images with ground-truth
(green) and predicted (red) boxes next to the question and answers, per modality.

Drawn with PIL only (no plotting library). Boxes are on the 0-1000 scale relative to the image.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import html
import io
import os
import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from clinkd_jax import files, tracking
from clinkd_jax.data import image as image_lib
from clinkd_jax.data.markup import to_bird
from clinkd_jax.data.records import MODALITIES, modality_of
from clinkd_jax.eval import answers
from clinkd_jax.eval.metrics import box_strings, extract_information, to_floats

TASK_NAMES = {"VG": "Visual grounding (VG)", "RO": "Referring object classification (ROC)",
              "GC": "Region captioning (RC, GC file)", "MII": "Medical image analysis (MIA, MII file)"}
GT, PRED, CHANGED = (40, 200, 80), (230, 50, 50), (250, 160, 0)


def _columns(result: dict) -> list[str]:
    if isinstance(result["mean"], dict):
        return list(result["mean"])
    return [result["metric"]]


def _value(result: dict, modality: str, column: str) -> float | None:
    per = result["per_modality"].get(modality)
    if per is None:
        return None
    if column == "mBMR":
        return _bmr(result, modality)
    return per if not isinstance(per, dict) else per.get(column)


def modality_rows(result: dict) -> tuple[list[str], list[list], list]:
    """The task's metrics, a row per modality ([modality, items, each metric or None]) and the mean row
    (["mean (8 modalities)", items, each metric's unweighted 8-modality mean])."""
    cols = _columns(result)
    rows = [[m, result["count"].get(m, 0), *(_value(result, m, c) for c in cols)] for m in MODALITIES]
    means = result["mean"] if isinstance(result["mean"], dict) else {cols[0]: result["mean"]}
    return cols, rows, ["mean (8 modalities)", sum(result["count"].values()), *(means[c] for c in cols)]


def markdown_table(task: str, result: dict) -> str:
    """One row per modality (count, each metric ×100) plus the unweighted 8-modality mean."""
    cols, rows, (label, total, *means) = modality_rows(result)
    lines = [f"### {TASK_NAMES.get(task, task)}", "", "| modality | n | " + " | ".join(cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for m, n, *values in rows:
        lines.append(f"| {m} | {n} | " + " | ".join("–" if v is None else f"{100 * v:.2f}" for v in values) + " |")
    lines.append(f"| **{label}** | {total} | " + " | ".join(f"**{100 * v:.2f}**" for v in means) + " |")
    notes = []
    if result.get("skipped"):
        notes += [f"{k}: not computed — {v}" for k, v in result["skipped"].items()]
    if result.get("unevaluated"):
        n = sum(result["unevaluated"].values())
        notes.append(f"{n} item(s) could not be evaluated and count as misses (empty answers): "
                     + ", ".join(f"{k} {v}" for k, v in result["unevaluated"].items()))
    odd = {k: v for k, v in result.get("answer_boxes", {}).items() if k != "boxes" and v}
    if odd:
        notes.append(f"the answers hold {result['answer_boxes']['boxes']} box(es): "
                     + ", ".join(f"{v} {k}" for k, v in odd.items())
                     + "; each is scored as written, as ClinKD's scorer does (see docs/evaluation.md)")
    if result.get("tokenizer") and "approximation" in result["tokenizer"]:
        notes.append(f"tokenizer: {result['tokenizer']}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines.append("\nValues ×100; a modality without items counts 0 in the mean (BiRD/ClinKD protocol).")
    return "\n".join(lines) + "\n"


def _headline_key(task: str, mean: dict) -> str | None:
    want = "mBMR" if task == "MII" else "CIDEr"
    return want if want in mean else next(iter(mean), None)


def headline(task: str, result: dict) -> str:
    """The one number per task that comparisons show: the task's metric; CIDEr for GC, mBMR for MII."""
    if not isinstance(result["mean"], dict):
        return result["metric"]
    return _headline_key(task, result["mean"])


def mean_value(task: str, mean) -> float | None:
    """The 8-modality mean of the task's headline metric from a result's "mean" (a number, or per metric)."""
    if not isinstance(mean, dict):
        return mean
    key = _headline_key(task, mean)
    return None if key is None else mean[key]


def headline_rows(runs: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Several evaluations side by side ({name: {task: result}}): a column per task ("<task> <headline metric>"),
    and a row per run: its name, then each task's headline 8-modality mean (None where not evaluated)."""
    tasks = [t for t in TASK_NAMES if any(t in r for r in runs.values())]
    cols = [f"{t} {headline(t, next(r[t] for r in runs.values() if t in r))}" for t in tasks]
    return cols, [[name, *(mean_value(t, r[t]["mean"]) if t in r else None for t in tasks)]
                  for name, r in runs.items()]


def headline_table(runs: dict[str, dict]) -> str:
    """`headline_rows` as a Markdown table (×100)."""
    cols, rows = headline_rows(runs)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, *cells in rows:
        lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{100 * v:.2f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(runs: dict[str, dict]) -> str:
    """Several evaluations side by side ({name: {task: result}}): per task, each modality's headline metric
    (×100) per run, and the 8-modality mean."""
    tasks = [t for t in TASK_NAMES if any(t in r for r in runs.values())]
    out = []
    for task in tasks:
        first = next(r[task] for r in runs.values() if task in r)
        col = headline(task, first)
        names = list(runs)
        lines = [f"**{TASK_NAMES[task]}: {col}** (×100)", "", "| modality | n | " + " | ".join(names) + " |",
                 "|---|---:|" + "---:|" * len(names)]
        for m in MODALITIES:
            n = first["count"].get(m, 0)
            if not n:
                continue
            cells = [_value(r[task], m, col) if task in r else None for r in runs.values()]
            lines.append(f"| {m} | {n} | " + " | ".join("–" if v is None else f"{100 * v:.2f}" for v in cells) + " |")
        means = []
        for r in runs.values():
            mean = r.get(task, {}).get("mean")
            v = mean.get(col) if isinstance(mean, dict) else mean
            means.append("–" if v is None else f"**{100 * v:.2f}**")
        lines.append(f"| **mean (8 modalities)** | {sum(first['count'].values())} | " + " | ".join(means) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def bar_chart(task: str, result: dict, path: str, column: str | None = None, size=(640, 320)) -> None:
    """Per-modality bars of one metric (the task's headline: Recall@0.5, Accuracy, or mBMR / CIDEr)."""
    cols = _columns(result)
    column = column or next((c for c in ("mBMR", "CIDEr") if c in cols), cols[0])
    values = [_value(result, m, column) for m in MODALITIES]
    mean = result["mean"][column] if isinstance(result["mean"], dict) else result["mean"]
    top = max([v for v in values if v is not None] + [mean, 1e-9])
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    w, h = size
    left, bottom, plot_h = 40, h - 40, h - 80
    slot = (w - left - 10) / len(MODALITIES)
    d.text((left, 8), f"{TASK_NAMES.get(task, task)}: {column} per modality (mean {100 * mean:.2f})", fill="black")
    d.line([(left, bottom), (w - 10, bottom)], fill="black")
    for i, (m, v) in enumerate(zip(MODALITIES, values)):
        x0 = left + i * slot + 6
        if v is not None:
            bar = plot_h * v / top
            d.rectangle([x0, bottom - bar, x0 + slot - 12, bottom], fill=(70, 110, 200))
            d.text((x0, bottom - bar - 12), f"{100 * v:.1f}", fill="black")
        d.text((x0, bottom + 6), m[:10], fill="black")
    y = bottom - plot_h * mean / top
    d.line([(left, y), (w - 10, y)], fill=(200, 60, 60))
    files.save_image(path, img)


def _bmr(result, m):
    per = result["per_modality"].get(m)
    if per is None or not all(k in per for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L")):
        return None
    return sum(per[k] for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L")) / 6


def _draw_boxes(img: Image.Image, boxes: Sequence, color, width: int) -> None:
    d = ImageDraw.Draw(img)
    for b in boxes:
        if b is None:
            continue
        x1, y1, x2, y2 = (b[0] * img.width / 1000, b[1] * img.height / 1000, b[2] * img.width / 1000,
                          b[3] * img.height / 1000)
        if x2 > x1 and y2 > y1:
            d.rectangle([x1, y1, x2, y2], outline=color, width=width)


@dataclasses.dataclass(frozen=True)
class Shown:
    """One item of a gallery: the prediction line, its modality, the thumbnail (None: `error` says why) and its
    boxes on the 0-1000 scale: the ground truth, the predicted ones as written, those drawn ordered and clipped."""

    p: dict
    modality: str
    image: Image.Image | None
    error: str
    gt: list
    pred: list
    changed: list


def gallery_items(task: str, predictions: Sequence[dict], image_dir: str, per_modality: int = 4, seed: int = 0,
                  max_side: int = 320) -> list[Shown]:
    """A sample of `per_modality` items per modality (seeded), each with its thumbnail and boxes.

    Ground truth: boxes of the annotation (VG) or of the question (RO/GC: the referred region).
    Prediction: the boxes the VG scorer finds in the processed response, ordered and clipped (`eval.answers`;
    what cannot be a box is not drawn)."""
    rng = random.Random(seed)
    by_mod: dict[str, list[dict]] = {}
    for p in predictions:
        by_mod.setdefault(modality_of(p["image"]), []).append(p)
    shown = []
    for m in [m for m in MODALITIES if m in by_mod] + sorted(set(by_mod) - set(MODALITIES)):
        for p in rng.sample(by_mod[m], min(per_modality, len(by_mod[m]))):
            gt_text = p["annotation"] if task == "VG" else p["question"]
            gt = [to_floats(b) for b in box_strings(gt_text) + box_strings(_as_bird(gt_text))]
            pred = [b for b in answers.read_boxes(p["response"]) if b.box] if task == "VG" else []
            img, error = None, ""
            try:
                img = image_lib.to_rgb(image_lib.load_image(os.path.join(image_dir, p["image"])))
                img.thumbnail((max_side, max_side))
            except (image_lib.ImageError, OSError) as e:
                error = str(e)
            shown.append(Shown(p, m, img, error, gt, [b.box for b in pred if not b.changed],
                               [b.box for b in pred if b.changed]))
    return shown


def gallery(task: str, predictions: Sequence[dict], image_dir: str, out_dir: str, per_modality: int = 4,
            seed: int = 0, max_side: int = 320) -> str | None:
    """Thumbnails with boxes and texts for a sample of items per modality (`gallery_items`); returns the HTML page
    path. The page is self-contained (thumbnails embedded as PNG data): it displays inline in a notebook and
    stays whole when copied out of a bucket."""
    if not predictions:
        return None
    os.makedirs(out_dir, exist_ok=True)
    items = gallery_items(task, predictions, image_dir, per_modality, seed, max_side)
    counts = collections.Counter(modality_of(p["image"]) for p in predictions)
    rows = [f"<h2>{html.escape(TASK_NAMES.get(task, task))}</h2>",
            "<p>green: ground truth / referred region; red: predicted boxes; orange: predicted boxes written with "
            "swapped corners or outside 0-1000, drawn ordered and clipped (scored as written)</p>"]
    for m in dict.fromkeys(s.modality for s in items):
        rows.append(f"<h3>{html.escape(m)} ({counts[m]} items)</h3><div style='display:flex;flex-wrap:wrap'>")
        for s in (s for s in items if s.modality == m):
            if s.image is None:
                pic = f"<p><i>image not shown: {html.escape(s.error)}</i></p>"
            else:
                img = s.image.copy()
                _draw_boxes(img, s.gt, GT, 3)
                _draw_boxes(img, s.pred, PRED, 2)
                _draw_boxes(img, s.changed, CHANGED, 2)
                png = io.BytesIO()
                img.save(png, format="PNG")
                data = base64.b64encode(png.getvalue()).decode()
                pic = f"<img src='data:image/png;base64,{data}' width='{img.width}'>"
            rows.append(
                "<div style='margin:8px;width:340px;font:12px sans-serif'>" + pic
                + f"<p><b>Q:</b> {html.escape(s.p['question'])}</p>"
                + f"<p><b>reference:</b> {html.escape(s.p['annotation'])}</p>"
                + f"<p><b>model:</b> {html.escape(extract_information(s.p['response']))}</p></div>")
        rows.append("</div>")
    page = os.path.join(out_dir, f"{task}.html")
    files.write_text(page, "<!doctype html><meta charset='utf-8'><title>clinkd_jax " + task + "</title>\n"
                     + "\n".join(rows))
    return page


def tracked(results: dict, preds: dict, image_dir: str, per_modality: int, seed: int) -> tuple[dict, dict]:
    """An evaluation for experiment tracking (`clinkd_jax.tracking`): ({"eval/<task>/table": a table per modality
    (×100), "gallery/<task>": pictures with the ground-truth and predicted boxes}, {"eval/<task>/<metric>": each
    metric's 8-modality mean ×100})."""
    values, summary = {}, {}
    for task, result in results.items():
        cols, rows, mean = modality_rows(result)
        values[f"eval/{task}/table"] = tracking.Table(["modality", "n", *cols],
                                                      [[*r[:2], *(None if v is None else 100 * v for v in r[2:])]
                                                       for r in rows + [mean]])
        summary |= {f"eval/{task}/{c}": 100 * v for c, v in zip(cols, mean[2:])}
        if image_dir and os.path.isdir(image_dir) and per_modality > 0:
            pictures = [_picture(s) for s in gallery_items(task, preds[task], image_dir, per_modality, seed)
                        if s.image is not None]
            if pictures:
                values[f"gallery/{task}"] = pictures
    return values, summary


def _fractions(boxes) -> list[tuple]:
    """Boxes on the 0-1000 scale as fractions of the image, clipped; those with no area left out (as drawn)."""
    return [tuple(min(max(v / 1000, 0.0), 1.0) for v in b) for b in boxes
            if b is not None and b[2] > b[0] and b[3] > b[1]]


def _picture(s: Shown) -> tracking.Picture:
    caption = (f"{s.modality} | Q: {s.p['question']} | reference: {s.p['annotation']} | model: "
               f"{extract_information(s.p['response'])}")
    return tracking.Picture(s.image, {"ground_truth": _fractions(s.gt), "prediction": _fractions(s.pred + s.changed)},
                            caption)


def _as_bird(text: str) -> str:
    return to_bird(text) if "<|box_start|>" in text else ""
