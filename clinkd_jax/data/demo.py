"""The embedded demo data set: Med-GRIT-format train/test files over real medical images that ship
inside installed packages (pydicom, pydicom-data, scikit-image), with SYNTHETIC labels.

The images are real (CT head and spine, MR shoulder and abdomen, chest and leg radiographs, an
ultrasound of a lymph node, a fundus photograph). The findings are not: each image gets one drawn
marker — a "bright oval lesion" (bright yellow) or a "dark round cyst" (dark blue), a fifth to two fifths of
the side — at a random place (`layout="random"`), or centred in one cell of a 3 x 3 grid at one of two sizes
(`layout="grid"`: a box answer is one of 18 per kind, so grounding measures finding the marker rather than
writing an arbitrary place), and every question and answer is generated from that marker and the image's
modality and body part. The colours make the marker's kind visible in each patch it covers: drawn in grey
(near white and near black, VERSION 2), the demo's from-scratch vision tower did not tell the two kinds
apart better than always answering the commoner one. A training conversation asks 2-4 of the tasks,
grounding before any question that names the box. A model can learn the four Med-GRIT tasks on it
(grounding, naming the object in a box, region caption, whole-image description); nothing it learns is
medicine.

    python -m clinkd_jax.data.demo /tmp/demo      # writes images/, train.json, Test_{VG,RO,GC,MII}.json
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from clinkd_jax import files
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import markup

# (pydicom test file or "skimage:retina", modality prefix, dataset tag, what the image shows)
SOURCES = (
    ("693_UNCI.dcm", "ct", "pydicom-data", "CT slice of the head"),
    ("CT_small.dcm", "ct", "pydicom", "CT slice through a vertebra"),
    ("MR2_UNCI.dcm", "mr", "pydicom-data", "MR image of the shoulder"),
    ("examples_overlay.dcm", "mr", "pydicom", "MR slice of the abdomen"),
    ("RG1_UNCI.dcm", "x", "pydicom-data", "chest radiograph"),
    ("RG3_UNCI.dcm", "x", "pydicom-data", "radiograph of the lower leg"),
    ("US1_UNCI.dcm", "ultrasound", "pydicom-data", "ultrasound image of a lymph node"),
    ("skimage:retina", "fundus", "scikit-image", "fundus photograph of the retina"),
)
OBJECTS = ("bright oval lesion", "dark round cyst")
COLOURS = ((250, 220, 0), (20, 40, 160))  # RGB of each OBJECTS kind: bright yellow, dark blue
TASK_FILES = {"VG": "Test_VG.json", "RO": "Test_RO.json", "GC": "Test_GC.json", "MII": "Test_MII.json"}
VERSION = 3  # of what generate() writes; a demo folder written by another version is written again


def source_image(name: str, max_side: int) -> Image.Image:
    if name.startswith("skimage:"):
        from skimage import data as skdata

        img = Image.fromarray(getattr(skdata, name.split(":", 1)[1])())
    else:
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"{name} is not installed (pip install pydicom pydicom-data)")
        img = image_lib.load_dicom(path)
    img = img.convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(28, round(img.width * scale)), max(28, round(img.height * scale))), Image.BICUBIC)
    return img


def _where(cx: float, cy: float) -> str:
    v = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}" if v != "middle" else f"middle {h}"


LAYOUTS = ("random", "grid")
GRID_SIZES = (0.18, 0.3)  # grid layout: the marker's width as a fraction of the side; IoU of the two < 0.5


def draw_marker(img: Image.Image, kind: int, rng: np.random.Generator, layout: str = "random"):
    """Draw one marker; returns (image, box on the 0-1000 scale, relative centre)."""
    w, h = img.size
    if layout == "grid":  # centred in one of 3 x 3 cells, one of two sizes
        cell, size = int(rng.integers(9)), GRID_SIZES[int(rng.integers(len(GRID_SIZES)))]
        bw = size * w
        bh = bw * h / w if kind == 1 else size * h * 0.75  # round cyst: circle; oval lesion: flatter
        x1, y1 = ((cell % 3) + 0.5) / 3 * w - bw / 2, ((cell // 3) + 0.5) / 3 * h - bh / 2
    else:
        # a fifth to two fifths of the side: at the demo's 224 px, at least two merged image tokens across
        bw, bh = (rng.uniform(0.2, 0.4) * w, rng.uniform(0.2, 0.4) * h)
        if kind == 1:
            bh = bw * h / w  # round cyst: circle
        x1, y1 = rng.uniform(0.05, 0.95 - bw / w) * w, rng.uniform(0.05, 0.95 - bh / h) * h
    out = img.copy()
    d = ImageDraw.Draw(out)
    d.ellipse([x1, y1, x1 + bw, y1 + bh], fill=COLOURS[kind])
    box = tuple(int(round(v)) for v in (x1 / w * 1000, y1 / h * 1000, (x1 + bw) / w * 1000, (y1 + bh) / h * 1000))
    return out, box, ((x1 + bw / 2) / w, (y1 + bh / 2) / h)


def qa(task: str, image_file: str, obj: str, box, where: str, desc: str) -> tuple[str, str]:
    b = markup.box_tag(box)
    question = f"<img>{image_file}</img> " + markup.QUESTIONS[task].format(obj=obj, box=b)
    if task == "VG":
        return question, f"<ref>{obj}</ref>{b}"
    if task == "RO":
        return question, obj
    if task == "GC":
        return question, f"A {obj} in the {where} of the {desc}."
    return question, f"This is a {desc}. There is a {obj} in the {where}."


def generate(out_dir: str, *, train_per_image: int = 6, test_per_image: int = 2, max_side: int = 224,
             seed: int = 0, layout: str = "random") -> dict:
    """Write the demo set to `out_dir`; returns counts. Deterministic for a seed. `layout`: where markers go
    (LAYOUTS; the module's docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"demo layout {layout!r} is not one of {LAYOUTS}")
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    train, tests = [], {t: [] for t in TASK_FILES}
    for s, (name, modality, tag, desc) in enumerate(SOURCES):
        base = source_image(name, max_side)
        case = os.path.splitext(name.split(":")[-1])[0]
        for v in range(train_per_image + test_per_image):
            kind = int(rng.integers(len(OBJECTS)))
            img, box, (cx, cy) = draw_marker(base, kind, rng, layout)
            stem = f"{modality}_00--{tag}--{case}--demo_{v:04d}"
            files.save_image(os.path.join(img_dir, stem + ".png"), img)
            obj, where = OBJECTS[kind], _where(cx, cy)
            if v < train_per_image:
                tasks = list(rng.permutation(list(TASK_FILES)))[: int(rng.integers(2, 5))]
                if "VG" in tasks:  # before the questions that name the box (RO, GC): nothing to copy it from
                    tasks.remove("VG")
                    tasks.insert(next((i for i, t in enumerate(tasks) if t in ("RO", "GC")), len(tasks)), "VG")
                conv = []
                for k, task in enumerate(tasks):
                    q, a = qa(task, stem + ".png", obj, box, where, desc)
                    if k:  # only the first question names the image
                        q = q.split("</img> ", 1)[1]
                    conv += [{"from": "user", "value": q}, {"from": "assistant", "value": a}]
                train.append({"id": stem, "conversations": conv})
            else:
                for task in TASK_FILES:
                    tests[task].append({"id": stem,
                                        "conversations": [list(qa(task, stem + ".png", obj, box, where, desc))]})
    files.write_json(os.path.join(out_dir, "train.json"), train, indent=1)
    for task, file in TASK_FILES.items():
        files.write_json(os.path.join(out_dir, file), tests[task], indent=1)
    return {"images": len(os.listdir(img_dir)), "train": len(train), **{t: len(v) for t, v in tests.items()}}


def ensure(out_dir: str, **kw) -> str:
    """`out_dir` holding the demo set generated with `kw` (generate's arguments); (re)written when absent
    or made with other arguments or by another VERSION. Returns out_dir."""
    meta_file = os.path.join(out_dir, "demo.json")
    meta = {**kw, "version": VERSION}
    if files.read_json(meta_file) == meta and os.path.isfile(os.path.join(out_dir, "train.json")):
        return out_dir  # (demo.json is written last: a set cut short by a kill or a full disk is made again)
    counts = generate(out_dir, **kw)
    files.write_json(meta_file, meta, indent=None)
    logging.getLogger("clinkd_jax.data").info("demo data set %s written to %s", counts, out_dir)
    return out_dir


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "demo_data"
    print(out, generate(out))
