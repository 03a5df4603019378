"""Faults a long run meets, through the command line users run: SIGKILL at any point (mid-step, during an
asynchronous checkpoint save, inside an in-run RCT round, while evaluation writes predictions, while pseudo-labels
are written), then the same command again; and a disk that fills during a checkpoint save.

A kill lands where the run is when a file or log line shows it reached the point (polled every 20 ms), so the exact
place varies a little between runs; what is checked holds wherever it lands. The full disk is a size-limited tmpfs
mounted over <workdir>/checkpoints in a private mount namespace (`unshare`): no privileges beyond user namespaces,
nothing left mounted."""

import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from clinkd_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "{'hidden_size': 32, 'num_attention_heads': 2, 'num_key_value_heads': 1, 'intermediate_size': 64}"

pytestmark = pytest.mark.faults


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def main_command(workdir, demo, *extra, module="clinkd_jax.main", config="configs/demo_train.py"):
    return [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
            f"--config.data.demo_dir={demo}", f"--config.model.text_overrides={SMALL}", "--config.train.steps=6",
            "--config.checkpoint.save_every=3", "--config.train.log_every=1", "--config.train.progress=False",
            "--config.data.text_buckets=(192,)", "--config.data.patch_buckets=(256,)",
            f"--config.data.max_pixels={112 * 112}", "--config.data.batch_size=2", *extra]


def finish(command):
    p = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stderr


def kill_when(command, reached, what):
    """Start `command`; SIGKILL it once `reached(line)` holds for a line of its log (or, with line None, for the
    files it wrote). Fails if the run ends before reaching the point."""
    p = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, lines = threading.Event(), []

    def read():
        for line in p.stderr:
            lines.append(line)
            if reached(line):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 900
    while p.poll() is None and time.time() < deadline:
        if seen.is_set() or reached(None):
            p.send_signal(signal.SIGKILL)
            p.wait()
            reader.join(5)
            return "".join(lines)
        time.sleep(0.02)
    p.kill()
    pytest.fail(f"the run ended (exit {p.returncode}) before {what}:\n{''.join(lines)[-3000:]}")


def uninterrupted_then(tmp_path, *extra):
    """(reference workdir, workdir, command): the command run to its end in the reference workdir, and the same
    command for the workdir a test interrupts."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    finish(main_command(ref, tmp_path / "demo", *extra))
    return ref, run, main_command(run, tmp_path / "demo", *extra)


def same_params(a, b):
    (_, x), (_, y) = (checkpoint.load_params(str(w / "params")) for w in (a, b))
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def rows(path):
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def lines_in(path) -> int:
    """Complete lines so far (a file being written may end mid-line)."""
    return open(path).read().count("\n") if os.path.isfile(path) else 0


def test_sigkill_anywhere_in_training_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path):
    """SFT with an RCT round inside (at step 4) and checkpoints at steps 1, 3, 4 (the round grows the pool), 6:
    killed mid-step (after step 2), then during step 3's asynchronous save, then inside the RCT round; each time
    the same command again. The final run resumes from the last complete step, redoes the round, and its per-step
    losses, parameters and corrections equal an uninterrupted run's."""
    ref, run, command = uninterrupted_then(
        tmp_path, "--config.rct.every_steps=4", "--config.rct.rounds=1", "--config.rct.num_items=2",
        "--config.rct.samples=2", "--config.rct.max_new_tokens=4", "--config.rct.batch_size=2",
        "--config.checkpoint.async_save=True")
    kill_when(command, lambda line: line is None and lines_in(run / "metrics.jsonl") >= 2, "step 2")
    assert not glob.glob(str(run / "checkpoints" / "3"))
    kill_when(command, lambda line: line is None and os.path.isdir(run / "checkpoints" / "3.orbax-checkpoint-tmp"),
              "step 3's save")
    log = kill_when(command, lambda line: line is not None and "RCT round 1 at step 4" in line, "the RCT round")
    assert "resumed from step" in log
    assert not os.path.isfile(run / "rct_round_1" / "corrected.jsonl")  # killed inside the round
    last = finish(command)
    # from step 3, or step 1 when the kill in the round came before step 3's asynchronous save was committed
    assert "resumed from step 3 " in last or "resumed from step 1 " in last, last[-3000:]
    got, want = rows(run / "metrics.jsonl"), rows(ref / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))  # each step once
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert open(run / "rct_round_1" / "corrected.jsonl").read() == open(ref / "rct_round_1" / "corrected.jsonl").read()
    same_params(ref, run)


KD = ("--config.stage=kd", "--config.teacher.preset=tiny_qwen", f"--config.teacher.text_overrides={SMALL}",
      "--config.teacher.dtype=float32")


def killed_after_step_4(tmp_path, *extra):
    """The command with `extra` run to its end, and again killed after step 4 and rerun: both runs' metrics rows,
    after checking the rerun resumed from step 3, logged each step once, with the same losses, and wrote the same
    parameters."""
    ref, run, command = uninterrupted_then(tmp_path, *extra)
    kill_when(command, lambda line: line is None and lines_in(run / "metrics.jsonl") >= 4, "step 4")
    assert "resumed from step 3 " in finish(command)
    got, want = rows(run / "metrics.jsonl"), rows(ref / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7)) and [r["loss"] for r in got] == [r["loss"] for r in want]
    same_params(ref, run)
    return got, want


def test_sigkill_in_on_policy_distillation_then_the_same_command_draws_and_learns_as_an_uninterrupted_run(tmp_path):
    """Distillation on-policy on half of the steps (seed 0: steps 3-6 sample the student's answers), killed after
    step 4, resumed from step 3's checkpoint: the same steps are on-policy, the same answers are sampled, and the
    per-step losses and the final parameters equal an uninterrupted run's exactly."""
    got, want = killed_after_step_4(tmp_path, *KD, "--config.kd.on_policy_fraction=0.5", "--config.kd.max_new_tokens=8",
                                    "--config.kd.divergence=jsd")
    assert [r["on_policy"] for r in got] == [r["on_policy"] for r in want] == [0, 0, 1, 1, 1, 1]
    assert [r["answer_tokens"] for r in got[2:]] == [r["answer_tokens"] for r in want[2:]]


@pytest.mark.parametrize("quantised", [(), ("--config.lora.base_quant=nf4", "--config.teacher.quant=int8")],
                         ids=["lora", "qlora"])
def test_sigkill_in_lora_distillation_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path, quantised):
    """Distillation into a LoRA student (adapters with dropout; the base read again at each start; QLoRA: read and
    quantised again, from an int8 teacher), killed after step 4, resumed from step 3's checkpoint of the adapters:
    the per-step losses and the written (folded) model equal an uninterrupted run's exactly."""
    killed_after_step_4(tmp_path, *KD, "--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.dropout=0.1",
                        *quantised)


def test_sigkill_while_predictions_or_pseudo_labels_are_written_then_every_item_once(tmp_path):
    """Evaluation killed while it writes predictions, the pseudo-label writer killed while it writes the store:
    the same command again ends with every item once (prediction lines as an uninterrupted evaluation's; one
    store entry per training record), and the killed store is marked incomplete (no meta.json) in between."""
    demo = tmp_path / "demo"
    evaluate = ["--config.eval.tasks=('VG', 'RO')", "--config.eval.limit=6", "--config.eval.batch_size=2",
                "--config.eval.max_new_tokens=6", "--config.eval.spice=False"]
    ref, run = tmp_path / "eval_ref", tmp_path / "eval_run"
    finish(main_command(ref, demo, *evaluate, config="configs/demo_eval.py"))
    command = main_command(run, demo, *evaluate, config="configs/demo_eval.py")
    kill_when(command, lambda line: line is None and lines_in(run / "predictions" / "Test_VG.jsonl") >= 2,
              "the first predictions")
    finish(command)
    for task in ("VG", "RO"):
        got, want = rows(run / "predictions" / f"Test_{task}.jsonl"), rows(ref / "predictions" / f"Test_{task}.jsonl")
        assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want) == list(range(6)), task
        assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"]), task

    store = tmp_path / "pl" / "pseudo_labels"
    command = main_command(tmp_path / "pl", demo, "--config.stage=kd", "--config.teacher.preset=tiny_qwen",
                           f"--config.teacher.text_overrides={SMALL}", "--config.kd.top_k=4",
                           module="clinkd_jax.train.pseudo_labels")
    finish(command)
    whole = json.load(open(store / "meta.json"))
    kill_when(command, lambda line: line is None and not os.path.isfile(store / "meta.json"), "the rewrite")
    assert not os.path.isfile(store / "meta.json")  # a KD run refuses the store until it is whole again
    finish(command)
    meta, index = json.load(open(store / "meta.json")), np.load(store / "index.npy")
    assert meta["entries"] == meta["records"] == whole["entries"] > 0
    assert sorted(index[:, 0].tolist()) == list(range(meta["records"]))  # every record once


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def in_namespace(script: str, cwd: str) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed to mount a small tmpfs without privileges")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=900)


def test_a_full_disk_during_a_save_is_one_error_and_the_run_resumes(tmp_path):
    """Steps 1, 3 and 6 are saved. With room for one and a half steps, step 3's save fills the disk: the run stops
    with one `disk error:` line naming the step, the directory, the space a step takes and what is free; step 1
    stays complete. Given room (the tmpfs grown), the same command resumes from step 1 (the partial step 3 is
    cleaned away) and its per-step losses equal an uninterrupted run's."""
    demo, ref, run = tmp_path / "demo", tmp_path / "ref", tmp_path / "run"
    finish(main_command(ref, demo))
    step_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ref / "checkpoints" / "1")
                     for f in fs)
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    command = shlex.join(main_command(run, demo))
    out = in_namespace(f"""
        mount -t tmpfs -o size={int(step_bytes * 1.5)} tmpfs {checkpoints} || exit 97
        {command} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
        ls {checkpoints} > {tmp_path}/after_full.ls
        mount -o remount,size={step_bytes * 8} {checkpoints} || exit 98
        {command} > {tmp_path}/again.out 2> {tmp_path}/again.err; echo $? > {tmp_path}/again.rc
        ls {checkpoints} > {tmp_path}/after_again.ls
    """, ROOT)
    assert out.returncode == 0, f"mount in a user namespace failed ({out.returncode}): {out.stderr[-2000:]}"
    full_err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", full_err[-3000:]
    line = full_err.strip().splitlines()[-1]
    assert line.startswith(f"disk error: checkpoint step 3 could not be written to {checkpoints}: no space left on "
                           "device (a step takes about "), line
    assert "step 1 is complete: free space and run the same command to resume" in line
    assert "1" in (tmp_path / "after_full.ls").read_text().split()  # the complete step, untouched
    again_err = (tmp_path / "again.err").read_text()
    assert (tmp_path / "again.rc").read_text().strip() == "0", again_err[-3000:]
    assert "resumed from step 1" in again_err
    assert (tmp_path / "after_again.ls").read_text().split() == ["1", "3", "6"]  # no partial step left
    assert losses(run) == losses(ref)
