"""Every user error is one line: the commands (`main`, `aot`, `convert`, `predict`, the pseudo-label writer) run as
a user runs them, on a table of mistakes (predict's image and question faults are found before any model is
read); each must exit 2 with exactly one `config error: ...` / `data error: ...` line that names what is at
fault, and no traceback. `--verbose` brings the traceback back."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "--config=configs/demo_train.py"
MAIN, AOT, CONVERT, PSEUDO, PREDICT = ("clinkd_jax.main", "clinkd_jax.aot", "clinkd_jax.convert",
                                       "clinkd_jax.train.pseudo_labels", "clinkd_jax.predict")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "images").mkdir()
    (d / "empty").mkdir()
    # predict's --model: a params folder by its config, without weights (every fault below is found before loading)
    (d / "model_config.json").write_text("{}")
    (d / "not_json.json").write_text("id,conversations\n1,hello\n")
    (d / "a_dict.json").write_text(json.dumps({"id": "1"}))
    (d / "no_ids.json").write_text(json.dumps([{"image": 3}]))
    (d / "hf_bad_json").mkdir()
    (d / "hf_bad_json" / "config.json").write_text("{not json")
    (d / "hf_no_weights").mkdir()
    (d / "hf_no_weights" / "config.json").write_text(
        open(os.path.join(ROOT, "tests", "golden", "gqa2_untied", "config.json")).read())
    (d / "raises.py").write_text("def get_config():\n    return 1 / 0\n")
    (d / "text.png").write_text("not an image")
    Image.new("RGB", (64, 48)).save(d / "small.png")
    Image.new("L", (8000, 6250)).save(d / "huge.png")  # 50 megapixels
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(d / "no_pixels.dcm")
    return d


def medgrit(files, name):
    return ["--config.data.format=medgrit", f"--config.data.image_dir={files / 'images'}",
            f"--config.data.train_files=('{files / name}',)"]


ON_POLICY = ["--config.stage=kd", "--config.teacher.preset=tiny_qwen", "--config.kd.on_policy_fraction=0.5"]
# (command, arguments (a function of the files folder), the line's start, text the line must hold)
CASES = [
    (MAIN, lambda f: [DEMO, "--config.optim.lrate=1"], "config error", "did you mean optim.learning_rate"),
    (MAIN, lambda f: [DEMO, "--config.optimm.learning_rate=1"], "config error", "no field 'optimm'"),
    (MAIN, lambda f: [DEMO, "--config.train.steps=abc"], "config error", "--config.train.steps=abc"),
    (MAIN, lambda f: [DEMO, "--wrkdir=/x"], "config error", "Did you mean: workdir"),
    (MAIN, lambda f: [DEMO, "--config.train.wandb_tags=('arm',)"], "config error",
     "train.wandb_tags=('arm',) is set but train.wandb_project is empty"),
    (MAIN, lambda f: [DEMO, "--workdir=gs://bucket/run"], "config error", "mount the bucket with gcsfuse"),
    (MAIN, lambda f: ["--config=nofile.py"], "config error", "--config=nofile.py: no such file"),
    (MAIN, lambda f: [f"--config={f / 'raises.py'}"], "config error", "ZeroDivisionError"),
    (MAIN, lambda f: [f"{DEMO}:an_argument"], "config error", "get_config() takes 0 positional arguments"),
    (MAIN, lambda f: [DEMO, "--config.stage=bogus"], "config error", "stage='bogus'"),
    (MAIN, lambda f: [DEMO, "--config.model.family=qwen4"], "config error", "model.family='qwen4'"),
    (MAIN, lambda f: [DEMO, "--config.data.patch_buckets=(130,)"], "config error", "multiples of 4"),
    (MAIN, lambda f: [DEMO, "--config.data.train_files=('mine.json',)"], "config error",
     "has no effect under data.format='demo'"),
    (MAIN, lambda f: [DEMO, "--config.data.format=medgrit", "--config.data.demo_dir=/d", "--config.data.image_dir="
                      + str(f / "images"), f"--config.data.train_files=('{f / 'no_ids.json'}',)"], "config error",
     "data.demo_dir='/d' has no effect"),
    (MAIN, lambda f: [DEMO, "--config.kd.pseudo_labels=/p"], "config error", "has no effect in stage 'sft'"),
    # on-policy distillation: the teacher scores the student's answers in the step, so it must read the same batch
    (MAIN, lambda f: [DEMO, *ON_POLICY, "--config.teacher.family=qwen3_vl"], "config error",
     "the teacher (qwen3_vl: 16 px patches"),
    (MAIN, lambda f: [DEMO, *ON_POLICY, "--config.kd.pseudo_labels=/p"], "config error",
     "kd.on_policy_fraction=0.5: the teacher must score answers written in the step"),
    (MAIN, lambda f: [DEMO, *ON_POLICY, "--config.data.pack=True"], "config error", "set data.pack=False"),
    (MAIN, lambda f: [DEMO, "--config.lora.rank=4", "--config.lora.targets=('model/layers/attn/q_proj',)"],
     "config error", "lora.targets[0]='model/layers/attn/q_proj' matches no layer"),
    (MAIN, lambda f: [DEMO, *ON_POLICY, "--config.lora.rank=4"], "config error", "does not run a LoRA student"),
    (MAIN, lambda f: [DEMO, *ON_POLICY, "--config.kd.on_policy_fraction=1.5"], "config error",
     "kd.on_policy_fraction=1.5 must be in [0, 1]"),
    (MAIN, lambda f: [DEMO, *medgrit(f, "missing.json")], "config error", "missing.json does not exist"),
    (MAIN, lambda f: [DEMO, *medgrit(f, "not_json.json")], "data error", "not_json.json: not valid JSON"),
    (MAIN, lambda f: [DEMO, *medgrit(f, "a_dict.json")], "data error", "expected a JSON list of items"),
    (MAIN, lambda f: [DEMO, *medgrit(f, "no_ids.json")], "data error", "no_ids.json[0]: malformed item"),
    (MAIN, lambda f: [DEMO, "--config.model.preset=", f"--config.model.orbax_dir={f / 'nope'}"], "config error",
     "is not a directory"),
    (MAIN, lambda f: [DEMO, "--config.model.preset=", f"--config.model.hf_dir={f / 'empty'}"], "config error",
     "no config.json"),
    (MAIN, lambda f: [DEMO, "--config.model.preset=", f"--config.model.hf_dir={f / 'hf_bad_json'}"], "config error",
     "config.json: not valid JSON"),
    (MAIN, lambda f: [DEMO, f"--config.data.tokenizer={f / 'empty'}"], "config error", "holds no tokenizer"),
    (AOT, lambda f: [], "config error", "--config is required"),
    (AOT, lambda f: [DEMO, "--topology=v9-8"], "config error", "not a Cloud TPU slice name"),
    (AOT, lambda f: [DEMO, "--config.model.remat=sometimes"], "config error", "model.remat='sometimes'"),
    (AOT, lambda f: [DEMO, "--config.optim.lrate=1"], "config error", "did you mean optim.learning_rate"),
    (CONVERT, lambda f: ["sideways", "--src", str(f), "--dst", str(f / "o")], "config error", "invalid choice"),
    (CONVERT, lambda f: ["hf-to-orbax", "--src", str(f / "nope"), "--dst", str(f / "o")], "config error",
     "is not a directory"),
    (CONVERT, lambda f: ["hf-to-orbax", "--src", str(f / "hf_no_weights"), "--dst", str(f / "o"), "--mesh=a,b"],
     "config error", "--mesh=a,b"),
    (CONVERT, lambda f: ["hf-to-orbax", "--src", str(f / "hf_no_weights"), "--dst", str(f / "o")], "config error",
     "no *.safetensors files"),
    (CONVERT, lambda f: ["orbax-to-hf", "--src", str(f / "empty"), "--dst", str(f / "o")], "config error",
     "not a clinkd_jax params directory"),
    (PSEUDO, lambda f: [DEMO, "--config.teacher.positions=own"], "config error", "teacher.positions='own'"),
    (PSEUDO, lambda f: [DEMO, "--config.kd.top_kk=3"], "config error", "did you mean kd.top_k"),
    (PREDICT, lambda f: [f"--model={f}", "--task=vg", "--question=x", f"--image={f / 'text.png'}"], "data error",
     "text.png: cannot read the image header"),
    (PREDICT, lambda f: [f"--model={f}", "--task=mii", f"--image={f / 'no_pixels.dcm'}"], "data error",
     "no_pixels.dcm: a DICOM file without"),
    (PREDICT, lambda f: [f"--model={f}", "--task=mii", f"--image={f / 'huge.png'}"], "data error",
     "50.0 megapixels"),
    (PREDICT, lambda f: [f"--model={f}", "--task=vg", "--question=", f"--image={f / 'small.png'}"], "data error",
     "needs a question"),
    (PREDICT, lambda f: [f"--model={f}", "--task=ro", "--box=10,10,70,20", f"--image={f / 'small.png'}"],
     "data error", "lies outside the image (of a 64 x 48 px image)"),
    (PREDICT, lambda f: [f"--model={f}", "--task=ro", "--box=10,10,20", f"--image={f / 'small.png'}"],
     "config error", "--box=10,10,20: expected 4"),
    (PREDICT, lambda f: [f"--model={f}", "--task=sing", f"--image={f / 'small.png'}"], "config error", "--task"),
    (PREDICT, lambda f: [f"--model={f / 'empty'}", "--task=mii", f"--image={f / 'small.png'}"], "config error",
     "neither a Hugging Face model directory"),
    (PREDICT, lambda f: [f"--model={f}", "--task=mii", f"--images={f}", "--out=x.json"], "config error",
     "--out=x.json: .json is not one of .jsonl"),
]


def run(module, args, workdir):
    if module in (MAIN, PSEUDO) and not any(a.startswith(("--wrkdir", "--workdir")) for a in args):
        args = [*args, f"--workdir={workdir}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TPU_SKIP_MDS_QUERY": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_each_user_error_is_one_line(files, tmp_path):
    with ThreadPoolExecutor(2) as pool:  # each case is its own process; two at a time on the two cores
        done = list(pool.map(lambda i: run(CASES[i][0], CASES[i][1](files), tmp_path / f"w{i}"), range(len(CASES))))
    assert len(CASES) >= 20
    wrong = []
    for (module, args, start, text), p in zip(CASES, done):
        said = [line for line in p.stderr.splitlines() if line.startswith(("config error:", "data error:"))]
        if p.returncode != 2 or len(said) != 1 or not said[0].startswith(start + ":") or text not in said[0] or \
                "Traceback" in p.stderr + p.stdout:
            wrong.append(f"{module} {args(files)} -> exit {p.returncode}: {p.stderr[-800:]}")
    assert not wrong, "\n\n".join(wrong)


def test_verbose_shows_the_traceback(files, tmp_path):
    p = run(MAIN, [DEMO, "--config.optim.lrate=1", "--verbose"], tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr and "lrate" in p.stderr
    p = run(MAIN, [DEMO, *medgrit(files, "not_json.json"), "--verbose"], tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr and "DataError" in p.stderr
