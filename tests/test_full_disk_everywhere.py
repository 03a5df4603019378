"""A full disk at every kind of write a recipe makes, through the command (`python -m clinkd_jax.main` on a recipe
of every stage kind, tests/small_recipe.py): tests/full_disk_at.py fills the disk at one write after another, each
run the previous one's command again, and the last run must leave what an uninterrupted recipe does. Apart from
tests/test_disk_full.py (a real tmpfs, fewer writes) so that the two files run side by side under xdist."""

import fnmatch
import glob
import json
import os
import re
import subprocess
import sys

import event_files
import pytest
from test_disk_full import named, one_disk_error, predictions
from test_faults import ENV, ROOT, finish

pytestmark = pytest.mark.faults


# A recipe's every write, the disk filling at each kind in turn (tests/full_disk_at.py): the file pattern, which write
# to it (its opening is the first, each line or record after it one more), the kinds of file (stage folder and
# numbers left out) whose writer it stands for, and (where not that file) what the run's last line names. In the
# order a recipe first writes them: each run is the previous one's command again, going on from where it stopped.
FILLS = [
    ("teacher/vocab_ids.json", 1, ["vocab_ids.json"]),
    ("data_sizes.json", 1, ["data_sizes.json"], "teacher/metrics.jsonl"),  # a cache: a warning, the run goes on
    ("teacher/metrics.jsonl", 3, ["metrics.jsonl"]),  # the second step's line
    ("teacher/tensorboard/*", 3, ["tensorboard/events.out.tfevents.*"]),  # a step's record
    ("teacher/checkpoints/*/_CHECKPOINT_METADATA", 1, ["checkpoints/*"], "teacher/checkpoints"),  # Orbax's (Python)
    ("teacher/eval_during_training/*/Test_VG.jsonl", 2, ["eval_during_training/step_N/predictions/*"]),
    ("teacher/eval_during_training/*/metrics.json", 1, ["eval_during_training/step_N/metrics.json"]),
    ("teacher/eval_curve.jsonl", 2, ["eval_curve.jsonl"]),
    ("teacher/loss.png", 1, ["loss.png"]),
    ("teacher/params/params.orbax-checkpoint-tmp/_METADATA", 1, ["params/params.orbax-checkpoint-tmp/*"],
     "teacher/params/params"),
    ("teacher/params/hf_assets/vocab.json", 1, ["params/hf_assets/*"]),  # one loop copies them all
    ("teacher/params/answer_settings.json", 1, ["params/answer_settings.json"]),
    ("teacher/params/model_config.json", 1, ["params/model_config.json"]),  # last: without it, no model
    ("teacher/summary.json", 1, ["summary.json"]),
    ("teacher/stage_done.json", 1, ["stage_done.json"]),
    ("rct/corrected.jsonl", 1, ["corrected.jsonl", "rct_round_N/corrected.jsonl"]),  # the same writer (a stage,
    ("rct/rct_summary.json", 1, ["rct_summary.json"]),                                 # a round in a run)
    ("sft/rct_round_1/rct_summary.json", 1, ["rct_round_N/rct_summary.json"]),
    # the evaluation's files (predictions and stamps, metrics, tables, charts, gallery) fill a real disk above
    ("eval/predictions/Test_RO.jsonl", 3, ["predictions/*", "metrics.json", "tables/*", "charts/*", "gallery/*",
                                           "results.md"]),
    ("recipe_summary.md", 1, ["recipe_summary.md"]),
]
STAGES = ("teacher", "rct", "kd", "sft", "eval")
CACHES = {"data_sizes.json"}  # a warning names it and the run goes on


def kind(name: str) -> str:
    """A file a recipe wrote, as the kind of file it is (no stage folder, numbers as N)."""
    parts = name.split("/")
    name = "/".join(parts[1:] if parts[0] in STAGES else parts)
    return re.sub(r"\d+", "N", re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", name))


def test_a_recipe_meets_a_full_disk_at_every_kind_of_write(tmp_path):
    """The ClinKD recipe (teacher evaluated while it trains, RCT, KD, SFT with an in-run RCT round, evaluation;
    tests/small_recipe.py), its disk filling at each kind of file it writes in turn: each run ends with one line
    naming that file, the same command goes on, and the last run leaves what an uninterrupted run does: the same
    steps and losses (metrics.jsonl and TensorBoard), evaluation curve, corrections, predictions and metrics, and no
    temporary or torn file. Every kind of file the uninterrupted run wrote is one FILLS stands for."""
    demo, ref, run = tmp_path / "demo", tmp_path / "ref", tmp_path / "run"
    recipe = ["clinkd_jax.main", "--config=tests/small_recipe.py", f"--config.data.demo_dir={demo}"]
    listing = tmp_path / "writes.jsonl"
    wrapper = [sys.executable, "tests/full_disk_at.py"]
    finish(wrapper + [str(ref), "--list", str(listing)] + recipe + [f"--workdir={ref}"])
    kinds = {kind(json.loads(x)["file"]) for x in open(listing)}
    stood_for = [k for k in kinds if not any(fnmatch.fnmatch(k, p) for _, _, ps, *_ in FILLS for p in ps)]
    assert not stood_for, f"written by the recipe, not filled by any FILLS entry: {stood_for}"

    for pattern, nth, _, *stops_at in FILLS:
        p = subprocess.run(wrapper + [str(run), pattern, str(nth)] + recipe + [f"--workdir={run}"], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=900)
        said = {"full.rc": str(p.returncode), "full.err": p.stderr}
        line = one_disk_error(said)
        assert fnmatch.fnmatch(os.path.relpath(named(line), run), (stops_at or [pattern])[0]), (pattern, line)
        if pattern in CACHES:
            assert f"{run}/{pattern}: no space left" in p.stderr, p.stderr[-3000:]  # said, as a warning
    finish([sys.executable, "-m"] + recipe + [f"--workdir={run}"])

    for stage in STAGES:
        got, want = (json.load(open(d / stage / "stage_done.json")) for d in (run, ref))
        for x in (got, want):
            x.get("final", {}).pop("tokens_per_s", None)  # the one thing that differs (time)
        assert got == want, stage  # final metrics, skips, RCT counts, evaluation curve and means
    for stage in ("teacher", "kd", "sft"):
        got, want = ([(s["step"], s["loss"]) for s in map(json.loads, open(d / stage / "metrics.jsonl"))]
                     for d in (run, ref))
        assert got == want, stage  # each step once, the same losses
        shown, shown_ref = (event_files.shown(d / stage / "tensorboard", "train/loss") for d in (run, ref))
        assert shown == shown_ref == [(s, pytest.approx(v, rel=1e-6)) for s, v in want], stage  # float32 in the events
    assert (run / "teacher/eval_curve.jsonl").read_text() == (ref / "teacher/eval_curve.jsonl").read_text()
    for corrected in ("rct/corrected.jsonl", "sft/rct_round_1/corrected.jsonl"):
        assert (run / corrected).read_text() == (ref / corrected).read_text(), corrected
    for task in ("VG", "RO"):
        assert predictions(run / "eval", task) == predictions(ref / "eval", task), task
    got, want = (json.load(open(d / "eval" / "metrics.json"))["tasks"] for d in (run, ref))
    assert got == want
    assert (run / "recipe_summary.md").read_text() == (ref / "recipe_summary.md").read_text()
    left = [f for f in glob.glob(f"{run}/**", recursive=True) if f.endswith(".tmp") or ".unreadable" in f]
    assert not left, left
