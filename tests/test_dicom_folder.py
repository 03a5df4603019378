"""Real DICOM studies as the image folder: training and evaluation on `<id>.dcm` files only.

The folder is built from the real DICOM files that ship with pydicom and pydicom-data (CT, MR,
radiographs, ultrasound; uncompressed, 8/16 bit, MONOCHROME and RGB): each demo item's image is the
DICOM file it was made from, under the item's id. The labels no longer describe the pixels (the demo's
drawn markers are absent); what is tested is that every item is read, trained on and evaluated from
DICOM, with no item skipped or scored unevaluated.
"""

import json
import os
import shutil
import sys

import pytest
import reference as R
from ml_collections import ConfigDict
from pydicom.data import get_testdata_file

from clinkd_jax import recipe
from clinkd_jax.data import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo_train  # noqa: E402

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def dicom_only_set(root: str) -> tuple[str, str]:
    """(data dir with train.json and Test_*.json, image dir holding only <id>.dcm files)."""
    src = os.path.join(root, "src")
    demo.generate(src, train_per_image=1, test_per_image=1, max_side=112)
    images, data = os.path.join(root, "dicom"), os.path.join(root, "data")
    os.makedirs(images)
    os.makedirs(data)
    for name in ("train.json", *demo.TASK_FILES.values()):
        items = [i for i in json.load(open(os.path.join(src, name))) if not i["id"].startswith("fundus")]  # not DICOM
        for i in items:
            shutil.copy(get_testdata_file(i["id"].split("--")[2] + ".dcm"), os.path.join(images, i["id"] + ".dcm"))
        with open(os.path.join(data, name), "w") as f:
            json.dump(items, f)
    return data, images


def test_train_and_evaluate_on_dicom_files(tmp_path):
    data, images = dicom_only_set(str(tmp_path / "set"))
    assert {os.path.splitext(f)[1] for f in os.listdir(images)} == {".dcm"}
    c = demo_train.get_config()
    c.model.text_overrides = SMALL
    R.override(c, {"data.format": "medgrit", "data.train_files": (os.path.join(data, "train.json"),),
                   "data.image_dir": images, "data.batch_size": 2, "data.text_buckets": (192, 320),
                   "data.patch_buckets": (64,), "data.max_pixels": 112 * 112, "data.num_epochs": 1,
                   "train.progress": False, "checkpoint.async_save": False,
                   "eval.data_dir": data, "eval.image_dir": images, "eval.tasks": ("VG", "RO"), "eval.limit": 4,
                   "eval.max_new_tokens": 4, "eval.patch_buckets": (64,), "eval.max_pixels": 112 * 112,
                   "eval.min_pixels": 56 * 56, "eval.text_buckets": (192,)})
    c.stages = ("sft", "eval")
    c.stage_settings = ConfigDict({"sft": {"stage": "sft"}, "eval": {"stage": "eval"}})
    out = dict(recipe.run(c, str(tmp_path / "w"))["stages"])
    n_train = len(json.load(open(os.path.join(data, "train.json"))))
    assert out["sft"]["skipped"] == {} and out["sft"]["steps"] == -(-n_train // 2)  # every record, one epoch
    assert out["eval"]["skipped"] == {}
    for task in ("VG", "RO"):
        preds = [json.loads(x) for x in open(tmp_path / "w" / "eval" / "predictions" / f"Test_{task}.jsonl")]
        assert len(preds) == 4 and all(p["image"].endswith(".dcm") and "unevaluated" not in p for p in preds)
