"""The TFDS builder (ArrayRecord, no TensorFlow) and the demo data generator."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from test_pipeline import CFG

from clinkd_jax.data import demo, tfds_medgrit
from clinkd_jax.data import pipeline as P
from clinkd_jax.data.records import read_medgrit


def test_demo_is_deterministic_and_covers_tasks_and_modalities(demo_dir, tmp_path):
    again = tmp_path / "again"
    demo.generate(str(again))
    for name in ("train.json", *demo.TASK_FILES.values()):
        assert (demo_dir / name).read_text() == (again / name).read_text()
    some = sorted(os.listdir(demo_dir / "images"))[5]
    assert (demo_dir / "images" / some).read_bytes() == (again / "images" / some).read_bytes()
    modalities = {r.modality for r in read_medgrit(str(demo_dir / "train.json"), str(demo_dir / "images"))}
    assert modalities == {"ct", "mr", "x", "ultrasound", "fundus"}
    for task, file in demo.TASK_FILES.items():
        items = json.loads((demo_dir / file).read_text())
        assert len(items) == 16 and all(len(i["conversations"]) == 1 for i in items), task
    vg = json.loads((demo_dir / "Test_VG.json").read_text())[0]["conversations"][0][1]
    assert vg.startswith("<ref>") and "<box>(" in vg
    first = set()
    for item in json.loads((demo_dir / "train.json").read_text()):  # grounding before any box in a question
        questions = [t["value"].split("</img> ")[-1] for t in item["conversations"][::2]]
        first.add(questions[0].split()[0])
        vg = [k for k, q in enumerate(questions) if q.startswith("Where is the")]
        assert not vg or "<box>" not in " ".join(questions[: vg[0]]), questions
        assert 2 <= len(questions) <= 4
    assert first == {"Where", "What", "Describe"}  # every kind of question also opens conversations


@pytest.mark.parametrize("layout", demo.LAYOUTS)
def test_marker_is_drawn_in_its_kind_colour_inside_its_box(layout):
    base = Image.new("RGB", (200, 100), (90, 90, 90))
    for kind, colour in enumerate(demo.COLOURS):
        img, box, (cx, cy) = demo.draw_marker(base, kind, np.random.default_rng(kind), layout)
        px = np.asarray(img)
        assert tuple(px[int(cy * 100), int(cx * 200)]) == colour  # the centre holds the kind's colour
        x1, y1, x2, y2 = (round(v / 1000 * s) for v, s in zip(box, (200, 100, 200, 100)))
        outside = np.ones((100, 200), bool)
        outside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = False
        assert (px[outside] == 90).all()  # nothing drawn outside the box the answers give


def test_grid_layout_puts_each_marker_in_a_cell_at_one_of_two_sizes(tmp_path):
    demo.generate(str(tmp_path), train_per_image=6, test_per_image=2, max_side=112, layout="grid")
    answers = [json.loads(open(tmp_path / "Test_VG.json").read())[i]["conversations"][0][1] for i in range(16)]
    boxes = [tuple(map(int, re.findall(r"\d+", a))) for a in answers]
    for (x1, y1, x2, y2), a in zip(boxes, answers):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2  # the centre of a cell: 1/6, 1/2 or 5/6 of the side (0-1000 scale)
        assert min(abs(cx - c) for c in (166.7, 500, 833.3)) <= 1 and min(abs(cy - c) for c in (166.7, 500, 833.3)) <= 1
        assert min(abs((x2 - x1) / 1000 - s) for s in demo.GRID_SIZES) <= 0.005, a
    # the region caption names the marker's cell
    caption = json.loads(open(tmp_path / "Test_GC.json").read())[0]["conversations"][0][1]
    cx, cy = (boxes[0][0] + boxes[0][2]) / 2000, (boxes[0][1] + boxes[0][3]) / 2000
    assert demo._where(cx, cy) in caption
    with pytest.raises(ValueError, match="demo layout 'diagonal'"):
        demo.generate(str(tmp_path / "x"), layout="diagonal")


def test_ensure_reuses_or_regenerates(tmp_path):
    root = str(tmp_path / "d")
    demo.ensure(root, train_per_image=1, test_per_image=1, max_side=56)
    stamp = os.path.getmtime(os.path.join(root, "train.json"))
    demo.ensure(root, train_per_image=1, test_per_image=1, max_side=56)  # same arguments: kept
    assert os.path.getmtime(os.path.join(root, "train.json")) == stamp
    demo.ensure(root, train_per_image=2, test_per_image=1, max_side=56)  # other arguments: written again
    assert len(json.load(open(os.path.join(root, "train.json")))) == 16
    meta = json.load(open(os.path.join(root, "demo.json")))
    json.dump({**meta, "version": demo.VERSION - 1}, open(os.path.join(root, "demo.json"), "w"))
    stamp = os.path.getmtime(os.path.join(root, "train.json"))
    demo.ensure(root, train_per_image=2, test_per_image=1, max_side=56)  # written by another version: again
    assert os.path.getmtime(os.path.join(root, "train.json")) > stamp


def test_tfds_round_trip_feeds_the_same_batches(demo_dir, tmp_path, encoder):
    """The built splits hold the JSON files' records and feed identical batches, a DICOM image included."""
    manual = tmp_path / "manual"
    shutil.copytree(demo_dir, manual)
    dicom_id = json.loads((manual / "train.json").read_text())[0]["id"]  # its image becomes the real DICOM file
    (manual / "images" / f"{dicom_id}.png").unlink()
    shutil.copy(get_testdata_file(dicom_id.split("--")[2] + ".dcm"), manual / "images" / f"{dicom_id}.dcm")
    demo_dir = manual
    builder = tfds_medgrit.build(str(tmp_path / "tfds"), str(demo_dir))
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        "train": 48, "test_vg": 16, "test_ro": 16, "test_gc": 16, "test_mii": 16}
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(builder.data_dir))
    from_tfds = tfds_medgrit.records(str(tmp_path / "tfds"), "train")
    from_json = read_medgrit(str(demo_dir / "train.json"), str(demo_dir / "images"))
    by_id = {r.id: r for r in from_json}
    assert by_id[dicom_id].images[0].endswith(".dcm")
    for i in range(len(from_tfds)):
        r = from_tfds[i]
        assert r.turns == by_id[r.id].turns and r.modality == by_id[r.id].modality
    # same records in the same order -> identical batches (the PNGs are RGB, so decoding is lossless)
    order = [by_id[from_tfds[i].id] for i in range(len(from_tfds))]
    cfg = P.PipelineConfig(**{**CFG.__dict__, "shuffle": False})
    for a, b in zip(P.make_batches(from_tfds, encoder, cfg), P.make_batches(order, encoder, cfg)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
