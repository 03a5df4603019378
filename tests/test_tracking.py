"""Weights & Biases tracking (clinkd_jax.tracking), read back from W&B's offline files (WANDB_MODE=offline; no
network): a resumed stage continues its W&B run without logging a step twice, settings that would be ignored are
refused, and a missing wandb package is a one-line config error before anything runs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("wandb", reason="the wandb extra (pip install 'clinkd_jax[wandb]'); tests/run_all.sh installs it")
import wandb_files as W  # noqa: E402

from clinkd_jax import tracking  # noqa: E402
from clinkd_jax.models.config import ConfigError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import base  # noqa: E402


@pytest.fixture
def fresh_wandb():
    """W&B reads its environment once per process (its settings singleton); each test sets its own."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def offline(monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def config(**train):
    c = base.get_config()
    c.stage = "sft"
    c.train.wandb_project = "clinkd-test"
    for k, v in train.items():
        c.train[k] = v
    return c


def test_a_resumed_stage_continues_its_run_without_logging_a_step_twice(tmp_path, offline):
    c, stage_dir = config(wandb_tags=("ablation", "seed0")), str(tmp_path / "teacher")
    with tracking.stage_run(c, stage_dir, "teacher", str(tmp_path)) as run:
        assert tracking.active() is run
        for step in range(1, 6):  # logged up to step 5; say the last checkpoint was step 3 when it was killed
            run.log(step, {"train/loss": 1.0 / step, "train/note": "not a number"})
    assert not isinstance(tracking.active(), tracking.WandbRun)  # nothing is logged between stages
    with tracking.stage_run(c, stage_dir, "teacher", str(tmp_path)) as run:  # resumed from step 3
        for step in range(4, 9):
            run.log(step, {"train/loss": 1.0 / step})
        run.summarize({"final/loss": 0.125})
    first, second = W.offline_runs(stage_dir)
    a, b = W.read(first), W.read(second)
    assert a["run"]["id"] == b["run"]["id"] and a["run"]["group"] == b["run"]["group"]
    group = a["run"]["group"]
    assert group.startswith("test_a_resumed_stage_continue") and a["run"]["name"] == f"{group}/teacher"
    assert a["run"]["job_type"] == "sft" and a["run"]["tags"] == ["ablation", "seed0"]
    steps = [row["_step"] for r in (a, b) for row in r["history"]]
    assert steps == list(range(1, 9))  # 4 and 5 once: the resumed process did not log them again
    assert all("train/note" not in row for row in a["history"])
    assert b["history"][0]["train/loss"] == pytest.approx(1 / 6)
    assert a["config"]["stage_name"] == "teacher" and a["config"]["optim"]["grad_accum"] == 8
    assert "stage_settings" not in a["config"] and b["summary"]["final/loss"] == 0.125


def test_a_failing_stage_is_marked_failed_and_results_are_logged_once_per_process(tmp_path, offline):
    c = config()
    with pytest.raises(RuntimeError):
        with tracking.stage_run(c, str(tmp_path / "eval"), "eval", str(tmp_path)) as run:
            run.log_result({"eval/VG/table": tracking.Table(["modality", "n", "Recall@0.5"], [["CT", 2, 50.0]])})
            raise RuntimeError("stopped")
    with tracking.stage_run(c, str(tmp_path / "eval"), "eval", str(tmp_path)) as run:
        run.log_result({"eval/VG/table": tracking.Table(["modality", "n", "Recall@0.5"], [["CT", 2, 25.0]])})
    a, b = (W.read(d) for d in W.offline_runs(str(tmp_path / "eval")))
    assert [row["_step"] for row in a["history"] + b["history"]] == [0, 1]
    table = W.media(b, W.logged(b["history"][0], "eval/VG/table"))
    assert table["columns"] == ["modality", "n", "Recall@0.5"] and table["data"] == [["CT", 2, 25.0]]
    assert (a["exit_code"], b["exit_code"]) == (1, 0)


@pytest.mark.parametrize("field, value", [("wandb_entity", "team"), ("wandb_run_name", "arm"),
                                          ("wandb_tags", ("a",))])
def test_settings_without_a_project_are_refused(field, value):
    c = config(**{field: value})
    c.train.wandb_project = ""
    with pytest.raises(ConfigError, match=f"train.{field}=.* is set but train.wandb_project is empty"):
        tracking.check(c)


@pytest.mark.parametrize("tags", [("",), ("x" * 65,), ("a", 3)])
def test_bad_tags_are_refused(tags):
    with pytest.raises(ConfigError, match="train.wandb_tags="):
        tracking.check(config(wandb_tags=tags))


def test_a_missing_package_is_one_config_error_line_before_any_stage(tmp_path):
    """Through the command a user runs, in an environment where `import wandb` fails."""
    blocker = tmp_path / "no_wandb" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join([str(blocker.parent), ROOT])}
    p = subprocess.run([sys.executable, "-m", "clinkd_jax.main", "--config=configs/demo.py",
                        f"--workdir={tmp_path / 'w'}", "--config.train.wandb_project=clinkd"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    said = [line for line in p.stderr.splitlines() if line.startswith("config error:")]
    assert p.returncode == 2 and len(said) == 1, p.stderr[-2000:]
    assert said[0] == ("config error: train.wandb_project='clinkd': the wandb package is not installed "
                       "(pip install 'clinkd_jax[wandb]'), or leave train.wandb_project empty")
    assert "Traceback" not in p.stderr and "starts:" not in p.stdout  # before the first stage
    assert not os.path.exists(tmp_path / "w" / "teacher")


@pytest.mark.e2e
def test_a_recipe_logs_each_stage_and_its_summary_and_resumes_its_runs(tmp_path, offline):
    """teacher (sft, evaluated at step 2) -> eval, through clinkd_jax.recipe as `main` runs it; then the teacher
    killed after step 3 was logged but before its checkpoint (the checkpoint removed) and the recipe run again."""
    import small_recipe
    from ml_collections import ConfigDict

    from clinkd_jax import recipe

    def plan():
        c = small_recipe.base()
        c.train.wandb_project, c.train.wandb_tags, c.train.log_every = "clinkd-test", ("e2e",), 1
        c.eval.gallery_per_modality = 1
        c.stages = ("teacher", "eval")
        c.stage_settings = ConfigDict({"teacher": {"stage": "sft", "train": {"steps": 3}, "eval": {"every_steps": 2}},
                                       "eval": {"stage": "eval"}})
        return c

    w = tmp_path / "ablation"
    out = recipe.run(plan(), str(w))
    runs = W.by_name(str(w))
    group = runs[next(iter(runs))][0]["run"]["group"]
    assert group.startswith("ablation-") and set(runs) == {f"{group}/{n}" for n in ("teacher", "eval", "recipe")}
    (teacher,), (ev,), (rec,) = (runs[f"{group}/{n}"] for n in ("teacher", "eval", "recipe"))
    assert [r["run"]["job_type"] for r in (teacher, ev, rec)] == ["sft", "eval", "recipe"]
    assert all(r["run"]["tags"] == ["e2e"] and r["exit_code"] == 0 for r in (teacher, ev, rec))
    # the teacher: its metrics at every step as metrics.jsonl has them, and the evaluation during training
    jsonl = [json.loads(line) for line in open(w / "teacher" / "metrics.jsonl")]
    rows = {row["_step"]: row for row in teacher["history"]}
    assert sorted(rows) == [1, 2, 3]
    assert [rows[m["step"]]["train/loss"] for m in jsonl] == [m["loss"] for m in jsonl]
    curve = json.loads(open(w / "teacher" / "eval_curve.jsonl").readline())
    assert rows[2]["eval/VG"] == pytest.approx(100 * curve["VG"]) and "eval/VG" not in rows[3]
    assert teacher["config"]["stage_name"] == "teacher" and teacher["config"]["train"]["steps"] == 3
    assert teacher["summary"]["final/loss"] == pytest.approx(out["stages"][0][1]["final"]["loss"])
    # the evaluation: a table per task and modality, the headline means, the gallery with both kinds of boxes
    metrics = json.load(open(w / "eval" / "metrics.json"))["tasks"]
    assert ev["config"]["model"]["orbax_dir"] == str(w / "teacher" / "params")
    (row,) = ev["history"]
    for task in ("VG", "RO"):
        table = W.media(ev, W.logged(row, f"eval/{task}/table"))
        col = metrics[task]["metric"]
        assert table["columns"] == ["modality", "n", col] and len(table["data"]) == 9  # 8 modalities + the mean
        assert table["data"][-1] == ["mean (8 modalities)", 2, pytest.approx(100 * metrics[task]["mean"])]
        assert ev["summary"][f"eval/{task}/{col}"] == pytest.approx(100 * metrics[task]["mean"])
        gallery = W.logged(row, f"gallery/{task}")
        assert gallery["count"] >= 1 and all(os.path.isfile(os.path.join(ev["dir"], "files", f))
                                             for f in gallery["filenames"])
    boxes = W.media(ev, W.logged(row, "gallery/VG")["all_boxes"][0]["ground_truth"])
    assert boxes["box_data"] and all(0 <= v <= 1 for b in boxes["box_data"] for v in b["position"].values())
    # the recipe's summary: the stages, and the evaluations side by side (an ablation's arms are its rows)
    (row,) = rec["history"]
    stages = W.media(rec, W.logged(row, "recipe/stages"))
    assert [r[:2] for r in stages["data"]] == [["teacher", "sft"], ["eval", "eval"]]
    evals = W.media(rec, W.logged(row, "recipe/evaluations"))
    assert evals["columns"][:4] == ["evaluation", "model", "training", "MCG-RoPE gaps"] and evals["data"][0][:4] == \
        ["eval", "the last trained model", "SFT", "2/2"]
    assert evals["data"][0][4] == pytest.approx(100 * metrics["VG"]["mean"])

    # killed after step 3 was logged but before its checkpoint: the rerun resumes at step 2, computes step 3 again
    # and does not log it twice; the evaluation runs again and logs its result as its run's next entry
    shutil.rmtree(w / "teacher" / "checkpoints" / "3")
    for name in ("teacher", "eval"):
        os.remove(w / name / "stage_done.json")
    recipe.run(plan(), str(w))
    runs = W.by_name(str(w))
    assert {n: len(r) for n, r in runs.items()} == {f"{group}/{n}": 2 for n in ("teacher", "eval", "recipe")}
    first, again = runs[f"{group}/teacher"]
    assert again["run"]["id"] == first["run"]["id"] and json.load(open(w / "teacher" / "summary.json"))[
        "start_step"] == 2
    assert [row["_step"] for row in first["history"] + again["history"]] == [1, 2, 3]
    assert [row["_step"] for r in runs[f"{group}/eval"] for row in r["history"]] == [0, 1]


def test_the_ablation_arms_are_the_rows_of_the_recipe_table():
    """configs/demo_ablation.py: one row per arm's evaluation, with the model it evaluated and its gaps."""
    from clinkd_jax import recipe
    from configs import demo_ablation

    c = demo_ablation.get_config()
    plan = recipe.stage_configs(c, "/w")
    evals = {f"eval_{arm}": {"VG": {"metric": "Recall@0.5", "mean": 0.1 * k, "per_modality": {}, "count": {}}}
             for k, arm in enumerate(demo_ablation.ARMS)}
    table = recipe.evaluations_table(c, plan, evals)
    assert table.columns == ["evaluation", "model", "training", "MCG-RoPE gaps", "VG Recall@0.5"]
    gkd = "KD, jsd beta 0.5, on-policy on {} % of the steps"
    assert table.rows == [["eval_clinkd", "clinkd", "KD", "2/2", 0.0], ["eval_no_mcg", "no_mcg", "KD", "1/1", 10.0],
                          ["eval_no_kd", "no_kd", "SFT", "2/2", 20.0],
                          ["eval_neither", "neither", "SFT", "1/1", pytest.approx(30.0)],
                          ["eval_gkd_half", "gkd_half", gkd.format(50), "2/2", 40.0],
                          ["eval_gkd_all", "gkd_all", gkd.format(100), "2/2", 50.0]]


def test_no_w_and_b_account_is_one_config_error_before_the_stage(tmp_path, monkeypatch, fresh_wandb):
    """Online mode with no API key on a machine without a terminal (a pod's worker): one line, not W&B's
    traceback or a login prompt waiting forever."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no settings of this machine's user
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    ran = []
    with pytest.raises(ConfigError, match=r"train.wandb_project='clinkd-test': Weights & Biases did not start the "
                                          r"run \(No API key configured.*WANDB_MODE=offline"):
        with tracking.stage_run(config(), str(tmp_path / "sft"), "sft", str(tmp_path)):
            ran.append(True)
    assert not ran and not isinstance(tracking.active(), tracking.WandbRun)
