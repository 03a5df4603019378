"""Launchers, run the way they run: launch/tpu.sh against a stub `gcloud` that executes the remote
commands in scratch worker homes (two workers, one process each, jax.distributed auto-detected), and
the Colab notebook's cells against a real evaluation workdir. launch/gpu.sh runs for real (CPU
processes) in tests/test_multiprocess.py."""

import ast
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import types

import pytest

from clinkd_jax.data import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `gcloud compute tpus tpu-vm ...` and nothing else; workers are $STUB_ROOT/<vm>/worker_<i> (their $HOME),
# buckets are $STUB_ROOT/buckets/<name>. ssh runs the command with bash on every selected worker at once.
GCLOUD = r'''#!/usr/bin/env python3
import os, subprocess, sys
root, argv = os.environ["STUB_ROOT"], sys.argv[1:]
with open(os.path.join(root, "gcloud.log"), "a") as f:
    f.write(repr(argv) + "\n")
assert argv[:3] == ["compute", "tpus", "tpu-vm"], argv
verb = argv[3]
name = argv[5].split(":", 1)[0] if verb == "scp" else argv[4]
opt = lambda key: next((a.split("=", 1)[1] for a in argv if a.startswith(key + "=")),
                       argv[argv.index(key) + 1] if key in argv else None)
vm = os.path.join(root, name)
workers = [os.path.join(vm, f"worker_{i}") for i in range(int(os.environ.get("STUB_WORKERS", "2")))]
if verb == "describe":
    sys.exit(0 if os.path.isdir(vm) else 1)
if verb == "create":
    assert opt("--zone") and opt("--accelerator-type") and opt("--version"), argv
    for w in workers:
        os.makedirs(w)
    sys.exit(0)
chosen = workers if opt("--worker") == "all" else [workers[int(opt("--worker"))]]
if verb == "scp":
    src, dst = argv[4], argv[5].split(":", 1)[1]
    for w in chosen:
        subprocess.run(["cp", src, os.path.join(w, dst.replace("~/", ""))], check=True)
    sys.exit(0)
if verb == "ssh":
    cmd, port = opt("--command"), os.environ["STUB_PORT"]
    procs = []
    for i, w in enumerate(chosen):
        local = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # a worker is another machine
        env = {**local, "HOME": w, "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "127.0.0.1",
               "SLURM_NTASKS": str(len(chosen)), "SLURM_PROCID": str(i), "SLURM_LOCALID": "0",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}
        log = open(os.path.join(w, f"ssh_{len(os.listdir(w))}.log"), "w")
        procs.append(subprocess.Popen(["bash", "-c", cmd], cwd=w, env=env, stdout=log, stderr=subprocess.STDOUT))
    sys.exit(max(p.wait() for p in procs))
sys.exit(f"stub gcloud: {verb} not handled")
'''
# what the worker set-up calls: uv makes the venv from this interpreter and records installs; gcsfuse
# "mounts" the bucket by a symlink; curl and sudo must not be needed when uv and gcsfuse exist
TOOLS = {
    "uv": r'''#!/usr/bin/env bash
echo "uv $*" >> "$STUB_ROOT/uv.log"
if [ "$1" = venv ]; then
  dir=${@: -1}; mkdir -p "$dir/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' "$REAL_PYTHON" > "$dir/bin/python"; chmod +x "$dir/bin/python"
fi
''',
    "gcsfuse": r'''#!/usr/bin/env bash
mount=${@: -1}; bucket=${@: -2:1}
mkdir -p "$STUB_ROOT/buckets/$bucket"; rmdir "$mount"; ln -s "$STUB_ROOT/buckets/$bucket" "$mount"
''',
    "mountpoint": '#!/usr/bin/env bash\n[ -L "${@: -1}" ]\n',
    "curl": '#!/usr/bin/env bash\necho "curl must not run: $*" >&2; exit 9\n',
    "sudo": '#!/usr/bin/env bash\necho "sudo must not run: $*" >&2; exit 9\n',
}
TINY = '{"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}'
HINT = """it's "quoted", has $HOME and spaces"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"gcloud": GCLOUD, **TOOLS}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_ROOT": str(tmp_path), "STUB_WORKERS": "2",
            "STUB_PORT": str(free_port()), "REAL_PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": ""}


def tpu(env, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), *args], capture_output=True, text=True,
                          env=env,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.multihost
def test_tpu_launcher_runs_its_commands_on_every_worker(tmp_path):
    """Create, ship, install, mount, run on both workers with --distributed, all from the script's own
    commands; overrides with tuples, JSON, quotes, spaces and `$` reach the run exactly as typed; the
    workdir is one folder in the bucket, shared by the workers, with commit-file checkpoints. The W&B variables
    set here reach the workers in a file only their user reads (never on a command line), and process 0 logs."""
    key = "local-key-" + "0" * 30
    env = {**stub_env(tmp_path), "WANDB_API_KEY": key, "WANDB_MODE": "offline"}
    overrides = ["--config.train.steps=2", "--config.data.batch_size=2", "--config.data.text_buckets=(256, 320)",
                 "--config.train.wandb_project=clinkd-tpu", "--config.train.log_every=1",
                 "--config.data.patch_buckets=(64,)", "--config.data.max_pixels=12544",
                 f"--config.model.text_overrides={TINY}", "--config.model.compact_vocab=data",
                 "--config.data.demo_train_per_image=2", "--config.mesh.shape=(1, -1, 1)",
                 "--config.train.progress=False",
                 f"--config.rct.hint={HINT}"]
    out = tpu(env, "--name", "vm", "--zone", "us-west4-a", "--type", "v5litepod-8", "--bucket", "gs://bkt/runs",
              "--config", "configs/demo_train.py", "--run-name", "r1", "--", *overrides)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("vm/worker_*/ssh_*.log")))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    assert "outputs: gs://bkt/runs/r1" in out.stdout
    work = tmp_path / "buckets" / "bkt" / "runs" / "r1"
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["preempted"]
    config = json.loads((work / "checkpoints" / "2" / "config" / "metadata").read_text())
    assert config["rct"]["hint"] == HINT and config["data"]["text_buckets"] == [256, 320]
    assert config["model"]["text_overrides"]["hidden_size"] == 32 and config["mesh"]["shape"] == [1, -1, 1]
    assert config["checkpoint"]["commit_files"] and (work / "checkpoints" / "2" / "commit_success.txt").is_file()
    runs = [p.read_text() for p in sorted(tmp_path.glob("vm/worker_*/ssh_*.log")) if "sft: 2 steps" in p.read_text()]
    assert len(runs) == 2  # both workers ran the job (one jax.distributed run of 2 processes)
    for w in (0, 1):  # the shipped checkout, not the repository, is what ran
        assert (tmp_path / "vm" / f"worker_{w}" / "clinkd_jax" / "clinkd_jax" / "main.py").is_file()
    installs = (tmp_path / "uv.log").read_text()
    assert "venv --allow-existing --python 3.12" in installs
    assert "clinkd_jax[eval,wandb]" in installs and "jax[tpu]" in installs
    for w in (0, 1):
        shipped = tmp_path / "vm" / f"worker_{w}" / ".clinkd_env"
        assert shipped.stat().st_mode & 0o777 == 0o600 and f"WANDB_API_KEY={key}" in shipped.read_text()
    assert key not in (tmp_path / "gcloud.log").read_text()  # no command line carried it
    import wandb_files

    (logged,) = [wandb_files.read(d) for d in wandb_files.offline_runs(str(work))]  # process 0's only
    assert [row["_step"] for row in logged["history"]] == [1, 2] and logged["exit_code"] == 0
    again = tpu(env, "--name", "vm", "--zone", "us-west4-a", "--type", "v5litepod-8", "--bucket", "gs://bkt/runs",
                "--config", "configs/demo_train.py", "--run-name", "r1", "--", *overrides)
    assert again.returncode == 0  # the VM exists: not created again; the finished run is resumed, not redone
    calls = (tmp_path / "gcloud.log").read_text()
    assert calls.count("'create'") == 1


def test_tpu_launcher_argument_errors(tmp_path):
    env = stub_env(tmp_path)
    assert tpu(env, "--name", "vm", "--dry-run").returncode == 2
    bad = tpu(env, "--name", "vm", "--zone", "z", "--type", "t", "--bucket", "/local", "--config", "configs/demo.py")
    assert bad.returncode == 2 and "--bucket must be gs://" in bad.stderr
    missing = tpu(env, "--name", "vm", "--zone", "z", "--type", "t", "--bucket", "gs://b", "--config",
                  "configs/nope.py")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    dry = tpu(env, "--name", "vm", "--zone", "z", "--type", "t", "--bucket", "gs://b", "--config", "configs/demo.py",
              "--dry-run", "--", "--config.data.text_buckets=(1, 2)")
    assert dry.returncode == 0 and not (tmp_path / "gcloud.log").exists()  # nothing ran
    assert r"--config.data.text_buckets=\\\(1\\\,\\\ 2\\\)" in dry.stdout  # quoted for two shells


def test_gpu_launcher_argument_errors():
    gpu = lambda *a: subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu.sh"), *a], capture_output=True,
                                    text=True)
    assert gpu("--gpus", "2").returncode == 2 and gpu("--bogus").returncode == 2
    assert "not one of none | lhs | lhs_cublas" in gpu("--xla-flags", "fast", "--config", "c", "--workdir", "w").stderr
    one = gpu("--config", "configs/demo.py", "--workdir", "/w", "--dry-run", "--", "--config.data.text_buckets=(1, 2)")
    assert shlex.split(one.stdout) == ["env", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"
                                       + (" " + os.environ["XLA_FLAGS"] if os.environ.get("XLA_FLAGS") else ""),
                                       "python3", "-m", "clinkd_jax.main", "--config=configs/demo.py", "--workdir=/w",
                                       "--config.data.text_buckets=(1, 2)"]  # printed so that it pastes back as typed


# ----------------------------------------------------------------------------------------- Colab
def notebook_cells():
    nb = json.load(open(os.path.join(ROOT, "launch", "colab_tpu_demo.ipynb")))
    assert nb["metadata"]["accelerator"] == "TPU"
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def python_of(cell: str) -> str:
    """The Python of a notebook cell: shell (`!`) and magic (`%`) lines dropped."""
    return "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("!", "%")))


def test_colab_kernel_never_holds_the_tpu():
    """Before (and while) the training process runs, the kernel imports nothing that takes the TPU."""
    cells = notebook_cells()
    train = next(i for i, c in enumerate(cells) if "-m clinkd_jax.main --config=configs/demo.py" in c)
    assert "$WORKDIR" in cells[train] and os.path.isfile(os.path.join(ROOT, "configs", "demo.py"))
    for cell in cells:
        for node in ast.walk(ast.parse(python_of(cell))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("jax", "jaxlib", "clinkd_jax", "flax") for n in names), cell


def test_colab_shows_results_and_galleries_inline(tmp_path):
    """The notebook's display cell, run on a real evaluation workdir: tables as Markdown, galleries as
    self-contained HTML (images embedded; Colab cannot show files the page points to)."""
    from clinkd_jax.eval import run as eval_run

    sys.path.insert(0, ROOT)
    from configs import base

    data = tmp_path / "data"
    demo.generate(str(data), train_per_image=0, test_per_image=1, max_side=112)
    work = tmp_path / "demo"
    for stage in ("eval_untrained", "eval_teacher", "eval_student"):
        preds = []
        for task in ("VG", "RO"):
            items = json.load(open(data / f"Test_{task}.json"))
            path = tmp_path / stage / f"Test_{task}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps({"id": i, "image": it["id"] + ".png",
                                                "question": it["conversations"][0][0],
                                                "annotation": it["conversations"][0][1],
                                                "response": it["conversations"][0][1]}) + "\n"
                                    for i, it in enumerate(items)))
            preds.append(str(path))
        c = base.get_config()
        c.stage, c.eval.predictions, c.eval.image_dir = "eval", tuple(preds), str(data / "images")
        eval_run.run(c, str(work / stage))
    (work / "recipe_summary.md").write_text("| stage | kind | result |\n")
    shown = []
    fake = types.ModuleType("IPython.display")
    fake.Markdown = lambda text: ("markdown", text)
    fake.HTML = lambda text: ("html", text)
    fake.display = shown.append
    cell = notebook_cells()[-1]
    code = python_of(cell)
    assert "WORKDIR" in code
    saved = {k: sys.modules.get(k) for k in ("IPython", "IPython.display")}
    sys.modules.update({"IPython": types.ModuleType("IPython"), "IPython.display": fake})
    try:
        exec(compile(code, "colab display cell", "exec"), {"WORKDIR": str(work)})
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    kinds = [k for k, _ in shown]
    assert kinds.count("markdown") == 4 and kinds.count("html") == 2
    for kind, text in shown:
        if kind == "html":
            assert len(re.findall(r"<img src='data:image/png;base64,", text)) >= 2 and "src='/" not in text
        elif "eval_" in text:
            assert "Visual grounding" in text and "100.00" in text  # responses = references: full marks
