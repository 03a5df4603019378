"""Several processes on localhost (jax.distributed, 127.0.0.1 coordinator, fake CPU devices), launched as
users launch them: through launch/gpu.sh (one process per "GPU", one machine or several "nodes"), or
`python -m clinkd_jax.main` / the pseudo-label writer once per process.

The data are the shape a pod meets: 2 text buckets x 2 patch buckets, shuffled, 2 finite epochs. Each
run has a deadline; a run that hangs (hosts out of step) fails the test with every process's output.
Agreement with one process: each global batch holds the same rows in the same order whatever the
host count, so losses agree up to float summation order across devices (rtol 1e-5; a wrong row, a lost
batch or an out-of-step host changes them at 1e-2 or more).
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from clinkd_jax.data import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = 600  # seconds for one launch of all its processes
# XLA's LLVM back end at -O0: these runs are compile-bound (4 bucket shapes x 3 stages), the models tiny;
# every side of a comparison runs with the same flags
XLA = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count="

# SFT then distillation into a fresh student of the other family, one recipe (clinkd_jax.recipe); tiny models,
# compact vocabulary
RECIPE = textwrap.dedent('''
    from ml_collections import ConfigDict
    from configs import demo_train

    SMALL = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


    def get_config():
        c = demo_train.get_config()
        c.model.text_overrides = SMALL
        c.teacher.text_overrides = SMALL
        c.teacher.dtype = "float32"
        c.model.compact_vocab = "data"
        c.data.format, c.data.image_dir = "medgrit", ""
        c.data.batch_size = 4
        c.data.text_buckets = (150, 210)
        c.data.patch_buckets = (48, 64)
        c.data.max_pixels = 112 * 112
        c.data.shuffle, c.data.num_epochs = True, 2
        c.train.progress = False
        c.train.log_every = 1
        c.checkpoint.async_save = False
        c.mesh.shape = (1, -1, 1)
        c.stages = ("kd3", "sft", "kd")
        # SFT packs conversations into rows (data.pack), distillation does not: both plans meet several hosts.
        # The student is a Qwen2.5-VL (56 px windows: 4 per 112 px image) with LoRA adapters (rank 4) on an int8 base
        # (QLoRA), taught by the Qwen2-VL SFT model read in int8.
        # kd3: a Qwen3-VL student (16 px patches, DeepStack) taught by a fresh Qwen3-VL (no teacher of another
        # family reads its patches), on-policy on half of its steps (GKD: the student's sampled answers); first, so
        # that the sizes file the test reads last is the Qwen2-VL stages'; sft names its own source (a preset), else
        # it would start from kd3's Qwen3-VL.
        student = {"preset": "tiny_qwen", "family": "qwen2_5_vl", "vision_overrides": {"window_size": 56}}
        qwen3 = {"preset": "tiny_qwen", "family": "qwen3_vl"}
        fresh = {"preset": "tiny_qwen"}
        c.stage_settings = ConfigDict({"sft": {"stage": "sft", "data": {"pack": True}, "model": fresh},
                                       "kd": {"stage": "kd", "teacher_from": "sft", "model": student,
                                              "lora": {"rank": 4, "alpha": 8.0, "base_quant": "int8"},
                                              "teacher": {"quant": "int8"}},
                                       "kd3": {"stage": "kd", "model": qwen3, "teacher": qwen3,
                                               "kd": {"on_policy_fraction": 0.5, "max_new_tokens": 8}}})
        return c
''')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data dir, config file): 24 conversations over 8 real images (3 sizes), the recipe above."""
    root = tmp_path_factory.mktemp("mp")
    demo.generate(str(root / "data"), train_per_image=3, test_per_image=1, max_side=112)
    (root / "recipe.py").write_text(RECIPE)
    return root / "data", root / "recipe.py"


def start(n, devices, args, port=None):
    """n processes of `python -m clinkd_jax.main args`, `devices` fake CPU devices each."""
    env = env_with(devices)
    port = port or free_port()
    multi = lambda i: [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                       f"--process_id={i}"] if n > 1 else []
    return [subprocess.Popen([sys.executable, "-m", "clinkd_jax.main", *args, *multi(i)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]


def finish(procs, deadline=DEADLINE, ok=True):
    """Every process's output; all must exit (0 when `ok`) before the deadline, else all are killed and the
    test fails with their outputs."""
    end, outs = time.time() + deadline, []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1, end - time.time()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = "\n".join(f"--- process {i}\n{(q.communicate()[0] or '')[-2500:]}" for i, q in enumerate(procs))
            pytest.fail(f"processes still running after {deadline} s (out of step?)\n{tails}")
    if ok:
        for i, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"process {i} exited {p.returncode}\n{out[-4000:]}"
    return outs


def run(n, devices, args):
    return finish(start(n, devices, args))


def until(reached, procs, what):
    """Wait for an event of a run (a file's lines, a log's step), however long the machine's load makes it take:
    fails at once, with the outputs, if a process ends before it, and only after DEADLINE if none does."""
    end = time.time() + DEADLINE
    while not reached():
        ended = [i for i, p in enumerate(procs) if p.poll() is not None]
        if ended or time.time() > end:
            for p in procs:
                p.kill()
            tails = "\n".join(f"--- process {i} (exit {p.poll()})\n{(p.communicate()[0] or '')[-2500:]}"
                              for i, p in enumerate(procs))
            pytest.fail(f"{what}: {'a process ended first' if ended else f'not within {DEADLINE} s'}\n{tails}")
        time.sleep(0.2)


def env_with(devices):
    return {**os.environ, "XLA_FLAGS": f"{XLA}{devices}", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
            "PYTHON": sys.executable}


def gpu_sh(*args, devices):
    """launch/gpu.sh as a user runs it (here its processes get CPU devices instead of GPUs)."""
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "gpu.sh"), *args], cwd=ROOT, env=env_with(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def process_logs(workdir):
    logs = os.path.join(workdir, "logs")
    return [open(os.path.join(logs, name)).read() for name in sorted(os.listdir(logs))]


def data_args(data):
    return [f"--config.data.train_files=('{data}/train.json',)", f"--config.data.image_dir={data}/images"]


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.mark.slow
@pytest.mark.multihost
def test_sft_and_kd_with_buckets_and_epochs_agree_with_one_process(setup, tmp_path, monkeypatch):
    """2 processes x 2 devices against 1 process x 4: the three stages finish their 2 epochs in step, with the
    same number of steps and the same losses (kd3's on-policy steps too: the same answers sampled on either
    mesh; kd's LoRA student too); each process compiles each step exactly once per batch shape its loop meets
    (jax logs each compile; a state that changed sharding, commitment or weak types after the first step would
    compile it again)."""
    data, recipe = setup
    monkeypatch.setenv("JAX_LOG_COMPILES", "1")
    one = start(1, 4, [f"--config={recipe}", f"--workdir={tmp_path / 'one'}", *data_args(data)])
    two = gpu_sh("--gpus", "2", "--config", str(recipe), "--workdir", str(tmp_path / "two"), "--", *data_args(data),
                 devices=2)  # both at once: three processes share the cores
    outs = finish([*one, two])
    logs = process_logs(tmp_path / "two")
    assert len(logs) == 2, outs[1]
    for log in logs:  # the launcher's XLA flag preset, then the caller's own flags, reached each process
        assert "XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true --xla_backend_opt" in log, log[:3000]
    for run, texts in (("one", outs[:1]), ("two", logs)):
        shapes = [json.load(open(tmp_path / run / stage / "summary.json"))["batch_shapes"]
                  for stage in ("sft", "kd", "kd3")]
        for text in texts:
            compiled = text.count("Compiling jit(train_step) ") + text.count("Compiling jit(sampled_step) ")
            assert compiled == sum(shapes) and min(shapes) >= 2, (run, shapes)
    for stage in ("sft", "kd", "kd3"):
        one, two = losses(tmp_path / "one" / stage), losses(tmp_path / "two" / stage)
        summary = json.load(open(tmp_path / "two" / stage / "summary.json"))
        assert summary["epochs"] == 2 and summary["steps"] == len(one) == len(two) > 10, stage
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), (stage, step)
    on = [json.loads(line)["on_policy"] for line in open(tmp_path / "two" / "kd3" / "metrics.jsonl")]
    assert 0 < sum(on) < len(on)  # both kinds of step ran
    student = json.load(open(tmp_path / "two" / "kd" / "params" / "model_config.json"))
    assert student["model_type"] == "qwen2_5_vl" and student["vision_config"]["window_size"] == 56
    qwen3 = json.load(open(tmp_path / "two" / "kd3" / "params" / "model_config.json"))
    assert qwen3["model_type"] == "qwen3_vl" and qwen3["vision_config"]["deepstack_visual_indexes"]
    sizes = np.asarray(list(json.load(open(tmp_path / "two" / "data_sizes.json"))["sizes"].values()))
    pairs = set(zip(np.searchsorted((150, 210), sizes[:, 0]), np.searchsorted((48, 64), sizes[:, 1])))
    assert len(pairs) == 4  # every (text, patch) bucket pair holds records: the plan really interleaves shapes


@pytest.mark.slow
@pytest.mark.multihost
def test_sigterm_on_one_host_stops_every_host_at_one_step(setup, tmp_path):
    """Two "nodes" (launch/gpu.sh --nodes 2, one process each); SIGTERM to node 1 only: every process stops
    at the same step, one consistent checkpoint is saved there, and the run resumes from it."""
    data, recipe = setup
    work = tmp_path / "pre"
    port = free_port()
    args = ["--config", str(recipe), "--workdir", str(work), "--", *data_args(data), "--config.stages=()",
            "--config.stage=sft", "--config.data.num_epochs=0", "--config.checkpoint.save_every=1000"]
    node = lambda rank, steps: gpu_sh("--gpus", "1", "--nodes", "2", "--node-rank", str(rank), "--coordinator",
                                      f"127.0.0.1:{port}", *args, f"--config.train.steps={steps}", devices=2)
    nodes = [node(0, 400), node(1, 400)]
    until(lambda: (work / "metrics.jsonl").exists() and len(losses(work)) >= 3, nodes, "three training steps")
    nodes[1].send_signal(signal.SIGTERM)  # the launcher of node 1 passes it on to its process
    finish(nodes)
    stopped = [int(line.split("saved step ")[1].split(";")[0])
               for log in process_logs(work) for line in log.splitlines() if "SIGTERM: saved step" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1] < 400, process_logs(work)[0][-3000:]
    step = stopped[0]
    assert max(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()) == step  # (Orbax also keeps step 1)
    saved = json.load(open(work / "checkpoints" / str(step) / "data" / "metadata"))
    assert set(saved) == {"epoch", "batch", "records", "plan"}  # one data state, the same for both hosts
    assert json.load(open(work / "summary.json"))["preempted"]
    port = free_port()
    finish([node(0, step + 2), node(1, step + 2)])
    assert json.load(open(work / "summary.json"))["start_step"] == step and max(losses(work)) == step + 2


@pytest.mark.slow
@pytest.mark.multihost
def test_evaluation_resumes_with_the_same_to_do_list_on_every_host(setup, tmp_path):
    """2 processes evaluate into one set of prediction files (process 0 writes); killed mid-file and resumed
    with host-local workdirs (process 1 sees no predictions at all), both hosts generate the same missing
    items, and every item ends up in the file exactly once."""
    data, _ = setup
    args = lambda work: ["--config=configs/demo_eval.py", f"--workdir={work}", "--config.eval.tasks=('VG','RO')",
                         f"--config.eval.data_dir={data}", f"--config.eval.image_dir={data}/images",
                         "--config.eval.batch_size=2", "--config.eval.limit=6", "--config.eval.max_new_tokens=6",
                         "--config.mesh.shape=(1,-1,1)", "--config.model.compact_vocab=data",
                         "--config.train.progress=False",
                         "--config.eval.text_buckets=(160, 256)", "--config.eval.patch_buckets=(64,)",
                         "--config.eval.max_pixels=12544", "--config.eval.min_pixels=3136"]
    w0, w1 = tmp_path / "host0", tmp_path / "host1"
    procs = start(2, 2, args(w0))
    vg = w0 / "predictions" / "Test_VG.jsonl"
    until(lambda: vg.exists() and vg.read_text().count("\n") >= 2, procs, "two VG predictions")
    for p in procs:
        p.kill()  # a preempted VM: no clean exit
    finish(procs, ok=False)
    lines = vg.read_text().splitlines(keepends=True)[:2]
    vg.write_text("".join(lines) + '{"id": 5, "image": "ct_0')  # the write the kill cut short
    (w0 / "predictions" / "Test_RO.jsonl").unlink(missing_ok=True)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "clinkd_jax.main", *args(w),
                               f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env_with(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, w in enumerate((w0, w1))]
    outs = finish(procs)
    todo = [[line.split("eval ")[1] for line in out.splitlines() if "items to generate" in line] for out in outs]
    assert todo[0] == todo[1] == ["VG: 4 of 6 items to generate", "RO: 6 of 6 items to generate"], outs[1][-2000:]
    for task in ("VG", "RO"):
        ids = [json.loads(line)["id"] for line in open(w0 / "predictions" / f"Test_{task}.jsonl")]
        assert sorted(ids) == list(range(6)), (task, ids)
    assert not (w1 / "predictions" / "Test_VG.jsonl").exists() or not (w1 / "predictions" / "Test_VG.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.multihost
def test_pseudo_label_writer_on_two_hosts(setup, tmp_path):
    """Each host writes its own shard, process 0 one index: the same entries as one process writes."""
    data, recipe = setup
    args = lambda work: ["-m", "clinkd_jax.train.pseudo_labels", f"--config={recipe}", f"--workdir={work}",
                         *data_args(data), "--config.stages=()", "--config.stage=kd",
                         "--config.teacher.preset=tiny_qwen",
                         "--config.kd.top_k=4", "--config.data.shuffle=False"]
    finish([subprocess.Popen([sys.executable, *args(tmp_path / "one")], cwd=ROOT, env=env_with(4),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)])
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *args(tmp_path / "two"), f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env_with(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    finish(procs)
    from clinkd_jax.data import pseudo_labels as store

    one, two = store.PseudoLabelReader(str(tmp_path / "one" / "pseudo_labels")), store.PseudoLabelReader(
        str(tmp_path / "two" / "pseudo_labels"))
    assert two.meta["shards"] == 2 and two.meta["entries"] == one.meta["entries"] == 24
    assert sorted(os.listdir(tmp_path / "two" / "pseudo_labels")) == [
        "index.npy", "meta.json", store.shard_name(0, 2), store.shard_name(1, 2)]
    for r in range(24):
        a, b = one.get(r), two.get(r)
        np.testing.assert_array_equal(a["positions"], b["positions"])
        np.testing.assert_allclose(b["logp"], a["logp"], rtol=1e-5, atol=1e-6)
    bad = subprocess.run([sys.executable, *args(tmp_path / "bad"), "--config.teacher.positions=own"], cwd=ROOT,
                         env=env_with(1), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config error: teacher.positions='own'" in bad.stderr


# process 1 leaves out one host-level collective, as a host out of step would; everything else is the user's command
SKIPPING = textwrap.dedent('''
    import runpy, sys
    import jax
    from clinkd_jax import distributed

    gather = distributed.allgather_json

    def out_of_step(obj, what):
        if what == "skipped items" and jax.process_index() == 1:
            return [obj] * jax.process_count()
        return gather(obj, what)

    distributed.allgather_json = out_of_step
    sys.argv[0] = "clinkd_jax.main"
    runpy.run_module("clinkd_jax.main", run_name="__main__", alter_sys=True)
''')


@pytest.mark.slow
@pytest.mark.multihost
def test_a_host_that_skips_a_collective_ends_the_run_with_one_line(setup, tmp_path, monkeypatch):
    """Host 1 leaves out the last collective of a training stage (the skipped-items count, after the final
    checkpoint): host 0 waits --collective_timeout seconds, then stops with one line naming itself, the collective
    and the stage, exit status 3, instead of waiting forever; the checkpoint it had saved resumes, and the resumed
    run exports the Hugging Face layout (every host gives its shards of the parameters; full vocabulary). Both
    runs log to Weights & Biases (offline): host 0 only, the resumed run continuing the same W&B run."""
    data, recipe = setup
    work, port = tmp_path / "run", free_port()
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [f"--config={recipe}", f"--workdir={work}", *data_args(data), "--config.stages=()", "--config.stage=sft",
            "--config.model.compact_vocab=", "--config.train.wandb_project=clinkd-test", "--config.train.log_every=1",
            "--config.train.steps=4", "--config.checkpoint.save_every=2", "--collective_timeout=30"]
    multi = lambda i: [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs = [subprocess.Popen([sys.executable, "-c", SKIPPING, *args, *multi(i)], cwd=ROOT, env=env_with(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = finish(procs, ok=False)
    line = [x for x in outs[0].splitlines() if x.startswith("collective timeout:")]
    assert procs[0].returncode == 3 and line == [
        "collective timeout: host 0 of 2 waited 30 s in allgather_json(skipped items) (stage sft) and not every host "
        "arrived (one crashed, is stuck, or is out of step); stopping (--collective_timeout sets the limit)"], outs[0]
    assert "collective timeout" not in outs[1]  # host 1 never waited: it is the one out of step
    assert max(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()) == 4
    port = free_port()
    finish(start(2, 2, [*args[:-3], "--config.train.steps=6", "--config.checkpoint.save_every=2",
                        "--config.checkpoint.export_hf=True", "--config.checkpoint.export_dtype=float32"], port=port))
    summary = json.load(open(work / "summary.json"))
    assert summary["start_step"] == 4 and summary["steps"] == 6 and max(losses(work)) == 6
    from safetensors.numpy import load_file

    exported = {k: v for f in glob.glob(str(work / "export_hf" / "*.safetensors")) for k, v in load_file(f).items()}
    assert len(exported) > 20 and all(np.isfinite(v).all() for v in exported.values())
    import wandb_files

    first, again = (wandb_files.read(d) for d in wandb_files.offline_runs(str(work)))  # process 0's, each run
    assert first["run"]["id"] == again["run"]["id"] and (first["exit_code"], again["exit_code"]) == (1, 0)
    assert [row["_step"] for row in first["history"] + again["history"]] == [1, 2, 3, 4, 5, 6]
    assert [row["train/loss"] for row in first["history"] + again["history"]] == [losses(work)[s] for s in range(1, 7)]


@pytest.mark.slow
@pytest.mark.multihost
def test_rct_round_on_two_hosts(setup, tmp_path):
    """A Reflective Correction round (greedy answers, flagging, corrector sampling) by 2 processes x 2 devices: the
    hosts generate in step and write the same corrected records (each its own copy, atomically), every item
    answered as by one process."""
    data, recipe = setup
    args = lambda work: [f"--config={recipe}", f"--workdir={work}", *data_args(data), "--config.stages=()",
                         "--config.stage=rct", "--config.rct.num_items=8", "--config.rct.samples=2",
                         "--config.rct.max_new_tokens=8", "--config.rct.batch_size=4", "--config.data.shuffle=False"]
    run(1, 4, args(tmp_path / "one"))
    run(2, 2, args(tmp_path / "two"))
    one, two = (json.load(open(tmp_path / w / "rct_summary.json")) for w in ("one", "two"))
    assert two["final"]["items"] == one["final"]["items"] == 8, two
    assert two["final"]["answered"] == one["final"]["answered"] == 8, two
    lines = (tmp_path / "two" / "corrected.jsonl").read_text().splitlines()
    sources = {json.loads(x)["rct"]["source"] for x in lines}  # one line per corrected exchange, none twice
    assert len(lines) == len(sources) == two["final"]["corrected"], lines
