"""Two processes on localhost (jax.distributed, 127.0.0.1 coordinator, 2 CPU devices each) run a few
distillation steps, save, resume, and agree with one process holding all 4 devices.

Agreement: each host reads every other record (strided slice) with per-host batch 2, one process reads
them in order with batch 4: the global batches hold the same records in another row order, so losses
agree up to float summation order (rtol 1e-5; a wrong data shard or lost batch changes them at 1e-2).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from clinkd_jax.data import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = '{"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(workdir, data, steps, extra=()):
    return [sys.executable, "-m", "clinkd_jax.main", "--config=configs/demo_train.py", f"--workdir={workdir}",
            "--config.stage=kd", "--config.teacher.preset=tiny_qwen", "--config.teacher.dtype=float32",
            f"--config.model.text_overrides={SMALL}", f"--config.teacher.text_overrides={SMALL}",
            "--config.data.format=medgrit", f"--config.data.train_files=('{data}/train.json',)",
            f"--config.data.image_dir={data}/images", "--config.data.shuffle=False", "--config.data.batch_size=4",
            "--config.data.text_buckets=(320,)", "--config.data.patch_buckets=(256,)", "--config.data.max_pixels=12544",
            "--config.data.num_epochs=0", "--config.train.total_steps_hint=4", f"--config.train.steps={steps}",
            "--config.train.progress=False", "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=False",
            "--config.mesh.shape=(1,-1,1)", "--config.model.compact_vocab=data", *extra]  # compact: CPU time


def run(cmds, devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def two_processes(workdir, data, steps):
    port = free_port()
    return run([command(workdir, data, steps, (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                               f"--process_id={i}")) for i in range(2)], devices=2)


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.mark.slow
def test_two_processes_agree_with_one_and_resume(tmp_path):
    data = str(tmp_path / "data")
    demo.generate(data, train_per_image=2, test_per_image=1, max_side=112)
    run([command(tmp_path / "one", data, 4)], devices=4)
    two_processes(tmp_path / "two", data, 2)
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["steps"] == 2
    saved = json.load(open(tmp_path / "two" / "checkpoints" / "2" / "data" / "metadata"))
    assert len(saved["per_host"]) == 2  # one data-iterator state per host
    two_processes(tmp_path / "two", data, 4)  # resume from step 2, each host with its own data state
    assert json.load(open(tmp_path / "two" / "summary.json"))["start_step"] == 2
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
