"""Launchers in dry-run mode: the commands they would run (no cloud, no GPU needed)."""

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True)


def test_gpu_multi_node_dry_run():
    out = launch("gpu.sh", "--gpus", "4", "--nodes", "2", "--node-rank", "1", "--coordinator", "10.0.0.1:1234",
                 "--config", "configs/demo.py", "--workdir", "/w", "--dry-run", "--", "--config.train.steps=3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4
    for gpu, line in enumerate(lines):
        assert f"CUDA_VISIBLE_DEVICES={gpu} " in line and f"--process_id={4 + gpu}" in line
        assert "--num_processes=8" in line and "--coordinator_address=10.0.0.1:1234" in line
        assert line.endswith("--config.train.steps=3")


def test_gpu_single_process_and_bad_args():
    out = launch("gpu.sh", "--config", "configs/demo.py", "--workdir", "/w", "--dry-run")
    assert out.stdout.strip() == "python3 -m clinkd_jax.main --config=configs/demo.py --workdir=/w"
    two = launch("gpu.sh", "--gpus", "2", "--config", "c", "--workdir", "/w", "--dry-run").stdout.splitlines()
    coords = {re.search(r"--coordinator_address=(\S+)", x).group(1) for x in two}
    assert len(coords) == 1 and next(iter(coords)).startswith("127.0.0.1:")
    assert launch("gpu.sh", "--gpus", "2").returncode == 2
    assert launch("gpu.sh", "--bogus").returncode == 2


def test_tpu_dry_run():
    out = launch("tpu.sh", "--name", "vm", "--zone", "us-west4-a", "--type", "v5litepod-16", "--bucket", "gs://b/runs",
                 "--config", "configs/demo.py", "--spot", "--dry-run", "--", "--config.data.batch_size=32")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "tpu-vm create vm --zone us-west4-a --accelerator-type v5litepod-16" in text and "--spot" in text
    run = [x for x in text.splitlines() if "clinkd_jax.main" in x]
    assert len(run) == 1 and "--worker=all" in run[0] and "--distributed" in run[0]
    assert "--config=configs/demo.py" in run[0] and "--config.data.batch_size=32" in run[0]
    assert "gcloud storage cp -r /tmp/clinkd_run gs://b/runs/vm-" in text
    assert launch("tpu.sh", "--name", "vm", "--dry-run").returncode == 2


def test_colab_notebook_runs_the_demo_config():
    nb = json.load(open(os.path.join(ROOT, "launch", "colab_tpu_demo.ipynb")))
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "--config=configs/demo.py" in code and os.path.isfile(os.path.join(ROOT, "configs", "demo.py"))
    assert "jax[tpu]" in code and nb["metadata"]["accelerator"] == "TPU"
