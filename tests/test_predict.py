"""`python -m clinkd_jax.predict`: one image or a folder, asked through the command as a user runs it. Its answers
must be the evaluation's for the same question (same prompt, buckets and decoding), boxes come back on both
scales and drawn where they are, DICOM windows apply, and a bad file in a folder is a counted line, not a crash."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_model
from ml_collections import ConfigDict
from PIL import Image

from clinkd_jax import predict
from clinkd_jax.data import demo, markup
from clinkd_jax.eval import run as eval_run

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OBJECT = "bright oval lesion"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    demo.generate(root, train_per_image=0, test_per_image=1, max_side=112)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model.save(str(tmp_path_factory.mktemp("run") / "params"))


def run_predict(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    p = subprocess.run([sys.executable, "-m", "clinkd_jax.predict", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_questions_are_the_test_files_questions(small_demo):
    """Each task's question is the one a Med-GRIT test file asks (its `<img>` tag aside), a pixel box turned to
    the 0-1000 scale of that image."""
    for task, file in demo.TASK_FILES.items():
        item = json.load(open(os.path.join(small_demo, file)))[0]
        asked = markup.strip_image_tag(item["conversations"][0][0])
        box = markup.parse_boxes(asked)[0] if "<box>" in asked else None
        obj = markup.IMG_TAG.sub("", asked).split("<ref>")[1].split("</ref>")[0] if task == "VG" else ""
        h, w = 500, 800
        px = None if box is None else (box[0] * w / 1000, box[1] * h / 1000, box[2] * w / 1000, box[3] * h / 1000)
        assert predict.question_text(predict.Question(task.lower(), obj, px), (h, w), "x") == asked
    with pytest.raises(predict.AskError, match="outside the image"):
        predict.question_text(predict.Question("ro", box=(10, 10, 900, 20)), (500, 800), "x")
    with pytest.raises(predict.AskError, match="needs a question"):
        predict.question_text(predict.Question("vg", "  "), (500, 800), "x")


def test_folder_answers_equal_the_evaluation(small_demo, model_dir, tmp_path):
    """The same VG question about every image of a folder, asked by `predict --images` and by the evaluation
    run over a test file holding those questions: the same responses, image by image, one compile."""
    images = sorted(os.listdir(os.path.join(small_demo, "images")))
    folder = tmp_path / "folder"
    shutil.copytree(os.path.join(small_demo, "images"), folder)
    question = f"Where is the <ref>{OBJECT}</ref> in this image?"
    test_file = tmp_path / "Test_VG.json"
    test_file.write_text(json.dumps([{"id": os.path.splitext(f)[0], "conversations": [
        [f"<img>{f}</img> {question}", f"<ref>{OBJECT}</ref><box>(1,1),(2,2)</box>"]]} for f in images]))
    c = tiny_model.eval_config(**{"model.preset": "", "model.orbax_dir": model_dir, "eval.files": (str(test_file),),
                       "eval.image_dir": str(folder), "data.format": "medgrit"})
    c.model.text_overrides = ConfigDict()
    eval_run.run(c, str(tmp_path / "eval"))
    evaluated = {p["image"]: p["response"] for p in map(json.loads, open(tmp_path / "eval/predictions/Test_VG.jsonl"))}

    out = tmp_path / "preds.jsonl"
    p = run_predict(f"--model={model_dir}", f"--images={folder}", "--task=vg", f"--question={OBJECT}",
                    f"--out={out}", "--batch_size=4")
    lines = [json.loads(x) for x in open(out)]
    assert {os.path.basename(x["image"]): x["response"] for x in lines} == evaluated
    assert len(lines) == len(images) and all(x["question"] == question for x in lines)
    assert f"{len(images)} of {len(images)} images answered" in p.stdout and "compiled 1 time(s)" in p.stdout


def test_one_dicom_with_a_window_and_a_box(model_dir, tmp_path):
    """One DICOM, windowed as asked, a region named in pixels: one JSON object; the PNG written is the windowed
    image at the file's size with the asked region drawn in green where it is."""
    from pydicom.data import get_testdata_file

    from clinkd_jax.data import image as image_lib

    dcm = get_testdata_file("CT_small.dcm")  # 128 x 128
    out = tmp_path / "ct.png"
    p = run_predict(f"--model={model_dir}", f"--image={dcm}", "--task=ro", "--box=32,16,96,64", "--window=40,400",
                    f"--out={out}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"answer", "boxes", "task", "seconds", "question", "response"} <= set(result) and result["task"] == "ro"
    assert result["question"] == "What is the object in <box>(250,125),(750,500)</box>?"
    drawn = np.asarray(Image.open(out).convert("RGB"))
    windowed = np.asarray(image_lib.load_dicom(dcm, window=(40, 400)).convert("RGB"))
    assert drawn.shape == windowed.shape == (128, 128, 3)
    assert tuple(drawn[16, 60]) == (0, 200, 0) and tuple(drawn[40, 32]) == (0, 200, 0)  # the box's top and left
    inside = (slice(20, 60), slice(36, 92))
    np.testing.assert_array_equal(drawn[inside], windowed[inside])  # the window asked for, untouched inside


def test_boxes_on_both_scales_and_drawn():
    answer = "<ref>cyst</ref><box>(100,200),(500,600)</box>"
    boxes = predict.boxes_of(answer, (300, 400))
    assert boxes == [{"0-1000": [100, 200, 500, 600], "pixels": [40.0, 60.0, 200.0, 180.0]}]
    img = predict.draw(Image.new("RGB", (400, 300)), {"boxes": boxes}, predict.Question("vg", "cyst"))
    a = np.asarray(img)
    assert tuple(a[60, 100]) == (230, 0, 0) and tuple(a[120, 40]) == (230, 0, 0) and a[120, 120].sum() == 0
    assert predict.answer_of("<|object_ref_start|>cyst<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
                             "<|im_end|>") == "<ref>cyst</ref><box>(1,2),(3,4)</box>"


def test_a_bad_file_in_a_folder_is_a_counted_line(small_demo, model_dir, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(os.path.join(small_demo, "images", sorted(os.listdir(os.path.join(small_demo, "images")))[0]),
                folder / "a.png")
    (folder / "b.png").write_text("not an image")
    out = tmp_path / "p.jsonl"
    p = run_predict(f"--model={model_dir}", f"--images={folder}", "--task=mii", f"--out={out}")
    lines = {os.path.basename(x["image"]): x for x in map(json.loads, open(out))}
    assert set(lines) == {"a.png", "b.png"} and "answer" in lines["a.png"]
    assert "b.png: cannot read the image header" in lines["b.png"]["error"]
    assert "1 of 2 images answered" in p.stdout and "1 not asked" in p.stdout
