"""`python -m clinkd_jax.serve`: the page started as a user starts it, then asked through its API (gradio_client)
and in a real headless browser (Debian's Chromium driven by Playwright). Its answers must equal the predict
command's for the same inputs; bad input must come back as its one-line reason while the server keeps serving."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
import tiny_model
from PIL import Image
from pydicom.data import get_testdata_file

from clinkd_jax.data import demo

pytestmark = pytest.mark.serve
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "GRADIO_ANALYTICS_ENABLED": "False"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model.save(str(tmp_path_factory.mktemp("run") / "params"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A demo image, a DICOM, and the bad inputs of the issue: not an image, a DICOM without pixel data, 50 MP."""
    d = tmp_path_factory.mktemp("images")
    root = demo.ensure(str(d / "demo"), train_per_image=0, test_per_image=1, max_side=112, seed=0)
    first = sorted(os.listdir(os.path.join(root, "images")))[0]
    shutil.copy(os.path.join(root, "images", first), d / "scan.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "ct.dcm")
    (d / "notes.png").write_text("not an image")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(d / "report.dcm")
    Image.new("L", (8000, 6250)).save(d / "huge.png")
    for name in SCRIPTED:  # the model's answer about these is scripted (the server runs tests/scripted_answers.py)
        shutil.copy(d / "scan.png", d / name)
    return d


# What the model "writes" about these files: an inverted box; a failure after it has answered (a bug)
SCRIPTED = {"inverted.png": "<ref>cyst</ref><box>(600,800),(200,400)</box><|im_end|>", "bug.png": "RAISE"}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "log.txt"
    examples = tmp_path_factory.mktemp("examples")
    scripted = log.parent / "answers.json"
    scripted.write_text(json.dumps(SCRIPTED))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "scripted_answers.py"), str(scripted),
                                 "clinkd_jax.serve", f"--model={model_dir}", f"--port={port}",
                                 f"--examples_dir={examples}"], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while "Running on" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    yield url, log
    proc.terminate()
    proc.wait(30)


def predicted(model_dir, image, task, question="", box="", window=""):
    args = [f"--model={model_dir}", f"--image={image}", f"--task={task}", f"--question={question}"]
    args += [f"--box={box}"] * bool(box) + [f"--window={window}"] * bool(window)
    p = subprocess.run([sys.executable, "-m", "clinkd_jax.predict", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


ASKED = [("scan.png", "vg", demo.OBJECTS[0], "", ""), ("scan.png", "ro", "", "10,20,80,90", ""),
         ("ct.dcm", "gc", "", "16,16,100,64", "40,400")]


def test_api_answers_equal_the_predict_command(server, model_dir, images):
    from gradio_client import Client, handle_file

    client = Client(server[0], verbose=False)
    with ThreadPoolExecutor(2) as pool:
        expected = list(pool.map(lambda a: predicted(model_dir, images / a[0], *a[1:]), ASKED))
    for (name, task, question, box, window), want in zip(ASKED, expected):
        drawn, answer, result = client.predict(handle_file(str(images / name)), task, question, box, window,
                                               api_name="/answer")
        assert answer == want["answer"]
        for key in ("task", "question", "answer", "boxes", "response"):
            assert result[key] == want[key], (name, task, key)
        img = np.asarray(Image.open(drawn).convert("RGB"))
        size = pydicom.dcmread(images / name).pixel_array.shape if name.endswith(".dcm") else Image.open(
            images / name).size[::-1]
        assert img.shape[:2] == tuple(size)
        if box:  # the asked region, drawn in green at its pixels
            x1, y1, x2, y2 = (int(v) for v in box.split(","))
            assert tuple(img[y1, (x1 + x2) // 2]) == (0, 200, 0) and tuple(img[(y1 + y2) // 2, x1]) == (0, 200, 0)


BAD = [("notes.png", "vg", "cyst", "", "notes.png: cannot read the image header"),
       ("report.dcm", "mii", "", "", "report.dcm: a DICOM file without"),
       ("scan.png", "vg", "  ", "", "needs a question"),
       ("scan.png", "ro", "", "10,10,500,20", "lies outside the image"),
       ("huge.png", "mii", "", "", "50.0 megapixels")]


def test_api_bad_input_is_one_message_and_serving_goes_on(server, images):
    from gradio_client import Client, handle_file

    client = Client(server[0], verbose=False)
    for name, task, question, box, message in BAD:
        drawn, answer, result = client.predict(handle_file(str(images / name)), task, question, box, "",
                                               api_name="/answer")
        assert drawn is None and answer.startswith("error: ") and message in answer and result == {"error": answer[7:]}
        assert "Traceback" not in answer and "/tmp/gradio" not in answer
    _, answer, result = client.predict(handle_file(str(images / "scan.png")), "mii", "", "", "", api_name="/answer")
    assert result["task"] == "mii" and answer == result["answer"]


@pytest.mark.browser
def test_in_a_browser(server, model_dir, images):
    """Upload, type, ask, read the answer off the page; a bad file's reason shows and the page answers the next
    request; a demo example clicked fills the inputs and its region comes back drawn on the page's image."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install chromium; tests/run_all.sh does as root)")
    from playwright.sync_api import sync_playwright

    want = predicted(model_dir, images / "scan.png", "vg", demo.OBJECTS[0])
    url, log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()

        def ask(name, question):
            page.goto(url)  # a new visitor, same server
            page.set_input_files("#image-file input[type=file]", str(images / name))
            page.fill("#question textarea", question)
            page.click("#ask")
            page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=120_000)
            return page.locator("#answer textarea").input_value()

        seen = len(log.read_text().splitlines())  # the log lines of this test's requests follow
        # a file that is not an image: its reason where the answer goes, one line in the server's log
        assert ask("notes.png", "cyst").startswith("error: notes.png: cannot read the image header")
        # the model writes an inverted box: kept as written, drawn ordered on the page's image, noted in the result
        assert ask("inverted.png", "cyst") == "<ref>cyst</ref><box>(600,800),(200,400)</box>"
        page.wait_for_selector("#drawn img", timeout=120_000)
        png = page.request.get(page.locator("#drawn img").get_attribute("src")).body()
        drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        h, w = drawn.shape[:2]
        top, x = round(0.4 * h), round(0.4 * w)  # the top edge of (200,400),(600,800), ordered; not its inside
        assert any(tuple(drawn[y, x]) == (230, 0, 0) for y in range(top - 1, top + 3))
        assert tuple(drawn[round(0.6 * h), x]) != (230, 0, 0)
        assert "corners swapped" in page.content()
        # a failure after the model answered (a bug): said on the page, one line in the log, serving goes on
        assert ask("bug.png", "cyst").startswith("error: failed: RuntimeError: scripted failure")
        lines = log.read_text().splitlines()[seen:]
        assert not any("Traceback" in x for x in lines)
        assert [x for x in lines if "notes.png" in x or "bug.png" in x] == [x for x in lines if "not answered" in x]
        assert [("notes.png" in x, "scripted failure" in x) for x in lines if "not answered" in x] == [
            (True, False), (False, True)]

        assert ask("scan.png", demo.OBJECTS[0]) == want["answer"]

        page.goto(url)
        example = next(e for e in demo.SOURCES if e[0] == "skimage:retina")  # the "name the object in a box" row
        page.get_by_text(f"{example[1]}_00--scikit-image--retina--demo_0000.png").click()
        page.click("#ask")
        page.wait_for_selector("#drawn img", timeout=120_000)
        png = page.request.get(page.locator("#drawn img").get_attribute("src")).body()
        drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert tuple(drawn[20, 80]) == (0, 200, 0) and tuple(drawn[80, 20]) == (0, 200, 0)  # region 20,20,150,150
        browser.close()


def test_a_full_disk_is_that_request_s_message(images, monkeypatch):
    """Gradio writes each answered picture to its cache; with no room there the request is answered with the one
    `disk error:` line (nothing of ours is written per request), and the next one, with room, is answered."""
    from PIL import Image

    from clinkd_jax import files, serve

    class Answers:  # the model's side, as predict.Predictor.ask returns it
        def ask(self, batch, q):
            return [{"image": name, "task": q.task, "answer": "a cyst", "boxes": [], "response": "a cyst"}
                    for name, _ in batch]

    answer = serve.answer_fn(Answers())
    monkeypatch.setattr(files, "free_bytes", lambda path: 0)
    drawn, text, result = answer(str(images / "scan.png"), "mii")
    assert drawn is None and text.startswith("error: disk error: ") and "no space left on the device (0 B free" in text
    monkeypatch.undo()
    drawn, text, result = answer(str(images / "scan.png"), "mii")
    assert isinstance(drawn, Image.Image) and text == "a cyst" and result["task"] == "mii"
