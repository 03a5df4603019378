"""`python -m clinkd_jax.predict`: one image or a folder, asked through the command as a user runs it. Its answers
must be the evaluation's for the same question (same prompt, buckets and decoding), boxes come back on both
scales and drawn where they are, DICOM windows apply, and a bad file in a folder is a counted line, not a crash."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tiny_model
from ml_collections import ConfigDict
from PIL import Image

from clinkd_jax import predict
from clinkd_jax.data import demo, markup
from clinkd_jax.eval import answers
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


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def run_predict(*args, answers: str | None = None, ok: bool = True):
    """The command as a user runs it; with `answers` (a JSON file), the model's answers scripted
    (tests/scripted_answers.py)."""
    head = [os.path.join(ROOT, "tests", "scripted_answers.py"), answers] if answers else ["-m"]
    p = subprocess.run([sys.executable, *head, "clinkd_jax.predict", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert (p.returncode == 0) == ok, p.stderr[-3000:]
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


def test_a_lora_adapter_is_folded_into_the_model_asked(model_dir, tmp_path):
    """--adapter (a PEFT LoRA adapter): the model asked is the checkpoint with the adapter folded in, and the
    command answers with it."""
    import jax

    from clinkd_jax import peft_adapters
    from clinkd_jax.models import Qwen2VL
    from clinkd_jax.models import lora as lora_lib
    from clinkd_jax.stage import StageContext

    c = predict.predict_config(model_dir)
    cfg, base = StageContext.of(c, "").load_model()
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    keys = iter(jax.random.split(jax.random.key(5), 1000))
    adapters = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                            lora_lib.init_adapters(lora_lib.adapted(Qwen2VL(cfg), lora), jax.random.key(4), None))
    peft_adapters.save_peft(str(tmp_path / "adapter"), cfg, adapters, lora, model_dir)
    asked = predict.Predictor(model_dir, adapter=str(tmp_path / "adapter")).generator.params
    expect = lora_lib.fold(lora_lib.merge(base, adapters), lora)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), asked, expect)
    assert not np.allclose(asked["model"]["layers"]["self_attn"]["q_proj"]["kernel"],
                           base["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
    image = tmp_path / "one.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(image)
    p = run_predict(f"--model={model_dir}", f"--adapter={tmp_path / 'adapter'}", f"--image={image}", "--task=mii")
    assert json.loads(p.stdout.strip().splitlines()[-1])["task"] == "mii"


def test_boxes_on_both_scales_and_drawn():
    answer = "<ref>cyst</ref><box>(100,200),(500,600)</box>"
    boxes = predict.boxes_of(answer, (300, 400))
    assert boxes == [{"written": "(100,200),(500,600)", "0-1000": [100, 200, 500, 600],
                      "pixels": [40.0, 60.0, 200.0, 180.0], "changed": []}]
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


# The answers, keyed by the image each is scripted for (tests/scripted_answers.py)
SCRIPTED = {"inverted": "<ref>cyst</ref><box>(600,800),(200,400)</box><|im_end|>",
            "zero": "<|box_start|>(300,300),(300,700)<|box_end|>",
            "outside": "<box>(-20,10),(1200,900)</box>", "few": "<box>(1,2),(3)</box>",
            "many": "<box>(1,2),(3,4,5)</box>",
            "nested": "<box><box>(1,2),(30,40)</box></box>", "unclosed": "<ref>cyst</ref><box>(10,20),(30,40)",
            "several": "<box>(1,2),(30,40)</box><box>(50,60),(5,6)</box>", "empty": "",
            "stray": "<|vision_start|><|im_start|>cyst<|object_ref_end|><|endoftext|>"}


def test_any_answer_through_the_command(small_demo, model_dir, tmp_path):
    """The model writes each case of the issue (scripted after it has generated): the folder's JSON lines keep
    every answer as written, each box ordered and clipped with what changed, or not a box with why; one image with
    an inverted box answers and draws it, ordered, where it is."""
    first = os.path.join(small_demo, "images", sorted(os.listdir(os.path.join(small_demo, "images")))[0])
    folder = tmp_path / "folder"
    folder.mkdir()
    for key in SCRIPTED:
        shutil.copy(first, folder / f"{key}.png")
    (tmp_path / "answers.json").write_text(json.dumps(SCRIPTED))
    out = tmp_path / "preds.jsonl"
    p = run_predict(f"--model={model_dir}", f"--images={folder}", "--task=vg", f"--question={OBJECT}",
                    f"--out={out}", answers=str(tmp_path / "answers.json"))
    lines = {os.path.splitext(os.path.basename(x["image"]))[0]: x for x in map(json.loads, open(out))}
    assert set(lines) == set(SCRIPTED) and f"{len(SCRIPTED)} of {len(SCRIPTED)} images answered" in p.stdout
    for key, line in lines.items():
        assert line["response"] == SCRIPTED[key] and "error" not in line
        assert line["boxes"] == predict.boxes_of(SCRIPTED[key], Image.open(first).size[::-1]), key
    assert lines["inverted"]["boxes"][0]["0-1000"] == [200, 400, 600, 800]
    assert lines["inverted"]["boxes"][0]["changed"] == [answers.SWAPPED]
    assert lines["zero"]["boxes"][0]["not_a_box"].startswith("zero area")
    assert lines["nested"]["boxes"][0]["not_a_box"] and len(lines["several"]["boxes"]) == 2
    assert lines["empty"]["boxes"] == lines["stray"]["boxes"] == [] and lines["empty"]["answer"] == ""

    drawn = tmp_path / "inverted.png"
    p = run_predict(f"--model={model_dir}", f"--image={folder / 'inverted.png'}", "--task=vg",
                    f"--question={OBJECT}", f"--out={drawn}", answers=str(tmp_path / "answers.json"))
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["answer"] == "<ref>cyst</ref><box>(600,800),(200,400)</box>"  # as the model wrote it
    a = np.asarray(Image.open(drawn).convert("RGB"))
    x1, y1, x2, y2 = (round(v) for v in result["boxes"][0]["pixels"])
    assert tuple(a[y1, (x1 + x2) // 2]) == (230, 0, 0) and tuple(a[(y1 + y2) // 2, x1]) == (230, 0, 0)


def test_settings_are_refused_before_the_model_loads(tmp_path, small_demo):
    """Each bad flag of predict, serve and convert: exit 2, one line naming it, and before any model is loaded
    (the model directory here has a config but no weights: loading it would fail with another message)."""
    from concurrent.futures import ThreadPoolExecutor

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_config.json").write_text("{}")
    png = os.path.join(small_demo, "images", sorted(os.listdir(os.path.join(small_demo, "images")))[0])
    (tmp_path / "a_folder.png").mkdir()
    base = ["-m", "clinkd_jax.predict", f"--model={model}", f"--image={png}", "--task=vg", "--question=cyst"]
    serve = ["-m", "clinkd_jax.serve", f"--model={model}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [
            (base + [f"--out={tmp_path / 'answer'}"], "--out=.*answer: no extension, so not one of .png"),
            (base + [f"--out={tmp_path / 'answer.txt'}"], r"--out=.*answer.txt: .txt is not one of .png"),
            (base + [f"--out={tmp_path / 'missing' / 'a.png'}"], "--out=.*: no such folder"),
            (base + ["--out=/proc/answer.png"], "--out=/proc/answer.png: cannot write in /proc"),
            (base + [f"--out={tmp_path / 'a_folder.png'}"], "is a folder, not a file"),
            (base + ["--box=1,2,3,4"], "--box is for task ro / gc, not vg"),
            (base + ["--window=40,400"], "a window .* applies to DICOM files only"),
            (base + ["--max_megapixels=0"], "--max_megapixels=0: must be positive"),
            (base + ["--batch_size=4"], "--batch_size=4: .* with --images"),
            (base + ["--config=nowhere.py"], "--config=nowhere.py: no such file"),
            (base[:2] + ["--model=nowhere", f"--image={png}", "--task=mii"], "--model=nowhere: no such directory"),
            (base[:3] + base[4:] + [f"--images={tmp_path}", f"--out={tmp_path / 'a.json'}"],
             "a.json: .json is not one of .jsonl"),
            (serve + ["--port=70000"], "--port=70000: not a port"),
            (serve + [f"--port={taken.getsockname()[1]}"], "cannot listen there"),
            (serve + ["--examples_dir=/proc/examples"], "--examples_dir=/proc/examples: cannot write in /proc"),
            (["-m", "clinkd_jax.convert", "orbax-to-hf", f"--src={model}", f"--dst={model / 'hf'}"],
             "--dst .* overlaps --src"),
            (["-m", "clinkd_jax.convert", "hf-to-orbax", f"--src={model}", f"--dst={tmp_path / 'o'}"],
             "has no config.json: not a Hugging Face model directory"),
            (["-m", "clinkd_jax.convert", "orbax-to-hf", f"--src={model}", f"--dst={png}"],
             "is a file, not a folder"),
        ]

        def run(args):
            return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                  timeout=300)

        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(run, [a for a, _ in cases]))
    for (args, message), p in zip(cases, done):
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), (args, p.stderr[-2000:])
        assert lines[0].startswith(("config error:", "data error:", "checkpoint error:")), lines
