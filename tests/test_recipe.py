"""Stages in one run: chaining through params, skipping finished stages, resuming an unfinished one."""

import json
import os
import re
import sys

import pytest
import reference as R
import small_recipe
from ml_collections import ConfigDict

from clinkd_jax import recipe
from clinkd_jax.model_source import ModelSource
from clinkd_jax.train.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why


def plan_config():
    c = small_recipe.base()
    c.stages = ("teacher", "kd", "sft", "eval")
    c.stage_settings = ConfigDict({
        "teacher": {"stage": "sft", "train": {"steps": 3}},
        "kd": {"stage": "kd", "teacher_from": "teacher", "teacher": {"dtype": "float32"},
               "model": {"preset": "tiny_qwen", "text_overrides": {"num_hidden_layers": 1}}, "train": {"steps": 2}},
        "sft": {"stage": "sft", "train": {"steps": 2}, "eval": {"every_steps": 1}},  # evaluated while it trains
        "eval": {"stage": "eval"},
    })
    return c


def responses(path):
    return [json.loads(line)["response"] for line in open(path)]


def test_plan_chains_params():
    plan = {name: cfg for name, cfg, _ in recipe.stage_configs(plan_config(), "/w")}
    assert plan["teacher"].model.preset == "tiny_qwen" and plan["teacher"].model.text_overrides.hidden_size == 32
    assert plan["kd"].teacher.orbax_dir == "/w/teacher/params" and plan["kd"].teacher.preset == ""
    assert plan["kd"].model.preset == "tiny_qwen" and plan["kd"].model.text_overrides.num_hidden_layers == 1
    assert plan["sft"].model.orbax_dir == "/w/kd/params" and plan["sft"].model.preset == ""  # previous stage
    assert plan["eval"].model.orbax_dir == "/w/sft/params" and plan["eval"].stage == "eval"
    assert plan["sft"].stages == ()


@pytest.mark.parametrize("change, message", [
    ({"stages": ("teacher", "nope")}, "stage_settings.nope does not exist"),
    ({"stage_settings.kd.teacher_from": "sft"}, "not an earlier training stage"),
    ({"stage_settings.sft.train.bogus": 1}, "stage_settings.sft.train.bogus is not a config field"),
])
def test_bad_plans_name_the_field(change, message):
    c = plan_config()
    for key, value in change.items():
        *path, last = key.split(".")
        target = c
        for p in path:
            target = target[p]
        with target.unlocked() if hasattr(target, "unlocked") else target:
            target[last] = value
    with pytest.raises(ConfigError, match=message):
        recipe.stage_configs(c, "/w")


def test_runs_in_order_skips_done_and_resumes(tmp_path, capsys):
    w = str(tmp_path)
    out = recipe.run(plan_config(), w)
    console = capsys.readouterr().out  # a line when each stage starts and ends: what it does, elapsed
    assert f"== [1/4] teacher starts: supervised fine-tuning, 3 steps, MCG-RoPE gaps 2/2 -> {w}/teacher" in console
    assert "== [2/4] kd starts: ClinKD distillation from teacher (alpha 0.5, T 0.5), 2 steps" in console
    assert "== [4/4] eval starts: evaluates the last trained model on VG, RO" in console
    assert re.search(r"== \[4/4\] eval done in 0 min \d+\.\d s \(\d+ min \d+\.\d s since the start\)", console)
    assert out["complete"] and [n for n, _ in out["stages"]] == ["teacher", "kd", "sft", "eval"]
    kd = json.load(open(os.path.join(w, "kd", "stage_done.json")))
    assert kd["stage"] == "kd" and "loss_kd" in kd["final"]
    assert set(json.load(open(os.path.join(w, "eval", "stage_done.json")))["means"]) == {"VG", "RO"}
    table = open(os.path.join(w, "recipe_summary.md")).read()
    assert "| kd | kd | 2 steps" in table and "| eval | eval | VG" in table
    assert "| modality | n | eval |" in table and set(out["evals"]["eval"]) == {"VG", "RO"}  # per-modality table
    assert "| model | VG Recall@0.5 | RO Accuracy |\n|---|---:|---:|\n| eval | " in table  # one row per evaluation
    vocab = json.load(open(os.path.join(w, "teacher", "params", "model_config.json")))["clinkd_vocab_ids"]
    assert vocab == json.load(open(os.path.join(w, "kd", "params", "model_config.json")))["clinkd_vocab_ids"]
    assert len(os.listdir(os.path.join(w, "demo_data", "images")))
    assert not os.path.exists(os.path.join(w, "kd", "demo_data"))
    # evaluation during training: a point per step; the last one is exactly what the eval stage gets from the
    # saved params (same greedy answers)
    curve = [json.loads(line) for line in open(os.path.join(w, "sft", "eval_curve.jsonl"))]
    assert [p["step"] for p in curve] == [1, 2] and set(curve[0]) == {"step", "VG", "RO"}
    assert dict(out["stages"])["sft"]["eval_curve"] == curve and "evaluated at step 1: VG" in table
    for task in ("VG", "RO"):
        during = responses(os.path.join(w, "sft", "eval_during_training", "step_2", "predictions",
                                        f"Test_{task}.jsonl"))
        assert during == responses(os.path.join(w, "eval", "predictions", f"Test_{task}.jsonl")) and len(during) == 2
    assert not os.path.exists(os.path.join(w, "kd", "eval_curve.jsonl"))
    # finished stages are not run again
    stamps = {n: os.path.getmtime(os.path.join(w, n, "stage_done.json")) for n in ("teacher", "kd", "sft", "eval")}
    again = recipe.run(plan_config(), w)
    assert again["complete"] and "== [3/4] sft: already done" in capsys.readouterr().out
    assert stamps == {n: os.path.getmtime(os.path.join(w, n, "stage_done.json")) for n in stamps}
    # an unfinished stage resumes from its own checkpoint; later stages run again
    os.remove(os.path.join(w, "sft", "stage_done.json"))
    os.remove(os.path.join(w, "eval", "stage_done.json"))
    c = plan_config()
    c.stage_settings.sft.train.steps = 4
    third = dict(recipe.run(c, w)["stages"])
    assert third["sft"]["steps"] == 4
    assert json.load(open(os.path.join(w, "sft", "summary.json")))["start_step"] == 2
    assert [p["step"] for p in third["sft"]["eval_curve"]] == [1, 2, 3, 4] and third["sft"]["eval_curve"][:2] == curve


def test_demo_recipe_plan():
    from configs import demo

    plan = {name: cfg for name, cfg, _ in recipe.stage_configs(demo.get_config(), "/w")}
    assert list(plan) == ["teacher", "kd", "sft", "eval_untrained", "eval_teacher", "eval_student"]
    # smaller student
    assert plan["teacher"].model.text_overrides.hidden_size > plan["kd"].model.text_overrides.hidden_size
    assert plan["kd"].teacher.orbax_dir == "/w/teacher/params" and tuple(plan["kd"].data.mrope_gaps) == (2, 2)
    sft = plan["sft"]  # SFT with RCT rounds inside, the teacher correcting
    assert sft.model.orbax_dir == "/w/kd/params" and sft.teacher.orbax_dir == "/w/teacher/params"
    assert (sft.rct.every_steps, sft.rct.rounds) == (120, 2) and sft.train.steps > 2 * 120
    assert all(cfg.rct.every_steps == 0 for name, cfg in plan.items() if name != "sft")
    assert plan["eval_untrained"].model.preset == "tiny_qwen" and plan["eval_untrained"].model.orbax_dir == ""
    assert plan["eval_student"].model.orbax_dir == "/w/sft/params"
    # the teacher is evaluated on grounding and naming while it trains; the evaluation stages run every task
    assert plan["teacher"].eval.every_steps == 500 and tuple(plan["teacher"].eval.tasks) == ("VG", "RO")
    assert all(plan[n].eval.every_steps == 0 for n in ("kd", "sft"))
    assert tuple(plan["eval_student"].eval.tasks) == ("VG", "RO", "GC", "MII")
    assert {cfg.data.demo_dir for cfg in plan.values()} == {"/w/demo_data"}  # generated once for all stages


def test_demo_ablation_plan():
    from configs import demo, demo_ablation

    plan = {name: cfg for name, cfg, _ in recipe.stage_configs(demo_ablation.get_config(), "/w")}
    arms = ["clinkd", "no_mcg", "no_kd", "neither", "gkd_half", "gkd_all"]
    assert list(plan) == ["teacher", *arms, *(f"eval_{a}" for a in arms)]
    gaps = {a: tuple(plan[a].data.mrope_gaps) for a in arms}
    assert gaps == {"clinkd": (2, 2), "no_mcg": (1, 1), "no_kd": (2, 2), "neither": (1, 1), "gkd_half": (2, 2),
                    "gkd_all": (2, 2)}
    assert {a: plan[a].stage for a in arms} == {"clinkd": "kd", "no_mcg": "kd", "no_kd": "sft", "neither": "sft",
                                                "gkd_half": "kd", "gkd_all": "kd"}
    # the on-policy arms: GKD's JSD (beta 0.5) on half or all of the steps; ClinKD's arms as before
    assert [(plan[a].kd.on_policy_fraction, plan[a].kd.divergence, plan[a].kd.jsd_beta) for a in arms if a[:3] == "gkd"
            ] == [(0.5, "jsd", 0.5), (1.0, "jsd", 0.5)]
    assert all(plan[a].kd.on_policy_fraction == 0 and plan[a].kd.divergence == "forward_kl" for a in arms[:4])
    for a in arms:  # the same fresh student, the same steps and seed; evaluated with its own positions
        assert plan[a].model.preset == "tiny_qwen" and plan[a].model.orbax_dir == ""
        assert plan[a].train.steps == plan["clinkd"].train.steps and plan[a].seed == plan["clinkd"].seed
        assert plan[a].rct.every_steps == 0
        assert plan[f"eval_{a}"].model.orbax_dir == f"/w/{a}/params"
        assert tuple(plan[f"eval_{a}"].data.mrope_gaps) == gaps[a]
    assert plan["clinkd"].teacher.orbax_dir == plan["no_mcg"].teacher.orbax_dir == "/w/teacher/params"
    same = {name: cfg for name, cfg, _ in recipe.stage_configs(demo.get_config(), "/w")}["teacher"]
    drop = lambda d: {k: v for k, v in d.items() if k != "stage_settings"}  # noqa: E731
    assert drop(plan["teacher"].to_dict()) == drop(same.to_dict())  # the demo's teacher


@pytest.mark.parametrize("name", ["clinkd_qwen2vl_7b", "clinkd_2b_from_7b", "clinkd_2b_from_7b_onpolicy",
                                  "clinkd_qwen25vl_7b_to_3b", "clinkd_qwen3vl_8b_to_2b"])
def test_paper_configs(name):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    assert (c.kd.alpha, c.kd.temperature, tuple(c.data.mrope_gaps)) == (0.5, 0.5, (2, 2))
    assert (c.optim.learning_rate, c.optim.grad_accum, c.data.text_buckets[-1]) == (5e-5, 8, 2048)
    assert c.data.max_pixels == 768 * 768 and (c.eval.min_pixels, c.eval.max_pixels) == (512 * 512, 1024 * 1024)
    plan = {n: cfg for n, cfg, _ in recipe.stage_configs(c, "/w")}
    assert plan["kd"].model.hf_dir.endswith("Instruct") and plan["sft"].model.orbax_dir == "/w/kd/params"
    assert plan["eval"].model.orbax_dir == "/w/sft_rct/params"
    on_policy = (plan["kd"].kd.on_policy_fraction, plan["kd"].kd.divergence, plan["kd"].kd.max_new_tokens)
    assert on_policy == ((0.5, "jsd", 80) if name.endswith("onpolicy") else (0.0, "forward_kl", 80))
    assert all(plan[n].kd.on_policy_fraction == 0 for n in plan if n != "kd")  # only the kd stage samples
    # ablations from the table in docs/recipe.md are plain overrides of this config
    c.stages = ("kd", "sft", "eval")  # no RCT
    assert {n: cfg for n, cfg, _ in recipe.stage_configs(c, "/w")}["eval"].model.orbax_dir == "/w/sft/params"
    c.stages = ("sft", "rct", "sft_rct", "eval")  # no KD: SFT starts from the base checkpoint
    assert {n: cfg for n, cfg, _ in recipe.stage_configs(c, "/w")}["sft"].model.hf_dir == c.model.hf_dir


def test_qwen25_family_runs_the_recipe(tmp_path):
    """model.family=qwen2_5_vl: the same chain (SFT teacher -> KD -> SFT with an RCT round and SASG over 2
    samples -> eval) on a tiny Qwen2.5-VL built from scratch, 56 px windows so the 112 px images span four windows
    each, boxes in Qwen2.5-VL's absolute pixels; every saved checkpoint says its family, and a family that
    disagrees with a checkpoint is refused by name."""
    c = plan_config()
    c.model.family = "qwen2_5_vl"
    c.model.vision_overrides = {"window_size": 56}
    c.data.box_markup = "absolute"  # Qwen2.5-VL's pixel boxes through training, RCT and evaluation
    c.stage_settings.sft.rct = ConfigDict({"every_steps": 1, "rounds": 1, "num_items": 2, "samples": 2,
                                           "max_new_tokens": 4})
    out = recipe.run(c, str(tmp_path))
    assert out["complete"] and set(out["evals"]["eval"]) == {"VG", "RO"}
    for stage in ("teacher", "kd", "sft"):
        saved = json.load(open(os.path.join(tmp_path, stage, "params", "model_config.json")))
        assert saved["model_type"] == "qwen2_5_vl" and saved["vision_config"]["window_size"] == 56, stage
    assert json.load(open(os.path.join(tmp_path, "sft", "summary.json")))["rct"]
    bad = plan_config()  # a checkpoint named with another family than its own
    R.override(bad, {"model.family": "qwen2_vl", "model.preset": "", "model.orbax_dir": f"{tmp_path}/kd/params"})
    bad.model.text_overrides, bad.model.vision_overrides = ConfigDict(), ConfigDict()
    with pytest.raises(ConfigError, match="holds a qwen2_5_vl model, but its family is set to 'qwen2_vl'"):
        ModelSource.of(bad, "model").geometry()


def test_qwen3_family_runs_the_recipe(tmp_path):
    """model.family=qwen3_vl: the same chain on a tiny Qwen3-VL from scratch (16 px patches, the learned position
    table, DeepStack into the LLM's first layers, q/k norms; the KD student's one LLM layer takes one DeepStack
    level), boxes in Qwen3-VL's JSON and its chat template through training, RCT and evaluation."""
    c = plan_config()
    c.model.family = "qwen3_vl"
    c.data.box_markup, c.data.chat_template = "json", "qwen3vl"
    c.stage_settings.sft.rct = ConfigDict({"every_steps": 1, "rounds": 1, "num_items": 2, "samples": 2,
                                           "max_new_tokens": 4})
    out = recipe.run(c, str(tmp_path))
    assert out["complete"] and set(out["evals"]["eval"]) == {"VG", "RO"}
    for stage, deepstack in (("teacher", [0, 1]), ("kd", [0]), ("sft", [0])):
        saved = json.load(open(os.path.join(tmp_path, stage, "params", "model_config.json")))
        assert saved["model_type"] == "qwen3_vl", stage
        assert saved["vision_config"]["deepstack_visual_indexes"] == deepstack, stage
    assert json.load(open(os.path.join(tmp_path, "sft", "summary.json")))["rct"]
