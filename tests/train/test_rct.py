"""Reflective Correction Training: flag rules, box forcing, a round between two SFT stages, rounds inside one."""

import json
import os
import sys

import pytest
import reference as R
from ml_collections import ConfigDict

from clinkd_jax import recipe
from clinkd_jax.data import dataset
from clinkd_jax.data.records import Record, SkipLog, Turn, read_sharegpt, text_problem
from clinkd_jax.eval import sasg
from clinkd_jax.train import loop, rct
from clinkd_jax.train.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import demo_train  # noqa: E402

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why

BOX = "<ref>cyst</ref><box>(0,0),(100,100)</box>"


def pool(c, workdir, files=()):
    """The training records a stage of `c` trains on (its extra files, plus `files`)."""
    recs = dataset.training_records(c, workdir, SkipLog())
    return dataset.with_extra(recs, tuple(c.data.extra_files) + tuple(files), c.data.extra_mode, SkipLog())


def test_flag_rules():
    sim = sasg.resolve("overlap")
    assert rct.flag(BOX, "<|box_start|>(0,0),(100,90)<|box_end|><|im_end|>", 0.5, sim) is None  # IoU 0.9
    assert rct.flag(BOX, "<|box_start|>(0,0),(100,40)<|box_end|>", 0.5, sim) == "grounding"  # IoU 0.4
    assert rct.flag(BOX, "a cyst", 0.5, sim) == "grounding"  # no box at all
    assert rct.flag("dark round cyst", "dark round cyst<|im_end|>", 0.5, sim) is None
    assert rct.flag("dark round cyst", "bright oval lesion", 0.5, sim) == "similarity"


def test_force_boxes():
    assert rct.force_boxes("the <ref>cyst</ref><box>(5,5),(9,9)</box> here", BOX) == \
        "the <ref>cyst</ref><box>(0,0),(100,100)</box> here"
    assert rct.force_boxes("no box", BOX) == BOX  # count mismatch: the reference itself
    assert rct.force_boxes("free text", "no boxes") == "free text"


def test_exchanges_split_multi_turn_records():
    r = Record("x", ("x.png",),
               (Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"), Turn("assistant", "a2")),
               "ct", "f[0]", 0)
    ex = rct.exchanges([r])
    assert [(e.question, e.answer) for e in ex] == [("q1", "a1"), ("q2", "a2")]


def small_config():
    """A tiny model on the demo data; threshold above 1 so that every answered item is flagged."""
    c = demo_train.get_config()
    c.model.text_overrides = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                              "intermediate_size": 64}
    R.override(c, {"data.batch_size": 2, "data.text_buckets": (192,), "data.patch_buckets": (256,),
                   "data.max_pixels": 112 * 112, "data.min_pixels": 56 * 56, "data.num_epochs": 0,
                   "train.progress": False, "checkpoint.async_save": False, "train.total_steps_hint": 4,
                   "rct.num_items": 6, "rct.samples": 2, "rct.threshold": 1.01, "rct.max_new_tokens": 6,
                   "rct.batch_size": 2, "rct.temperature": 1.0})
    return c


def test_round_between_sft_stages(tmp_path):
    c = small_config()
    c.stages = ("sft", "rct", "sft2")
    c.stage_settings = ConfigDict({"sft": {"stage": "sft", "train": {"steps": 2}},
                                   "rct": {"stage": "rct", "teacher_from": "sft"},
                                   "sft2": {"stage": "sft", "rct_from": "rct", "train": {"steps": 2}}})
    w = str(tmp_path)
    out = dict(recipe.run(c, w)["stages"])
    counts = out["rct"]["final"]
    assert counts["items"] == 6 and counts["flagged"] == 6  # threshold above 1: every item is flagged
    assert counts["corrected"] == 6 and counts["flagged_grounding"] + counts["flagged_similarity"] == 6
    corrected = [json.loads(line) for line in open(os.path.join(w, "rct", "corrected.jsonl"))]
    for item in corrected:
        assert os.path.isabs(item["images"][0]) and os.path.isfile(item["images"][0])
        ref = item["rct"]["source"]
        assert item["rct"]["reason"] in ("grounding", "similarity") and ref
        if item["rct"]["reason"] == "grounding":  # corrected grounding answers carry the reference boxes
            assert "<box>" in item["messages"][1]["content"]
    # the next SFT stage trains on the original records plus the corrected ones
    plan = {n: cfg for n, cfg, _ in recipe.stage_configs(c, w)}
    assert plan["sft2"].data.extra_files == (os.path.join(w, "rct", "corrected.jsonl"),)
    before = len(pool(plan["sft"], os.path.join(w, "sft")))
    assert len(pool(plan["sft2"], os.path.join(w, "sft2"))) == before + len(corrected)
    assert len(read_sharegpt(plan["sft2"].data.extra_files[0], "", log=SkipLog())) == len(corrected)
    assert out["sft2"]["steps"] == 2 and "| rct | rct | 6 answered, 6 flagged, 6 corrected |" in \
        open(os.path.join(w, "recipe_summary.md")).read()


def test_rounds_inside_sft_grow_the_pool_and_resume(tmp_path):
    """Rounds at steps 2 and 4 of one run (the model corrects itself), a checkpoint after each; the data
    stream goes on where it was after a round (not from epoch 0); a resumed run re-applies both rounds'
    corrections and still lists them; a missing round file stops the resume with its name."""
    c = small_config()
    R.override(c, {"model.compact_vocab": "data", "rct.num_items": 4, "rct.every_steps": 2, "rct.rounds": 2,
                   "train.steps": 5, "checkpoint.save_every": 100, "data.demo_train_per_image": 1,
                   "data.demo_test_per_image": 1})
    w = str(tmp_path)
    out = recipe.run_stage(c, w)
    assert [(r["round"], r["step"], r["flagged"]) for r in out["rct"]] == [(1, 2, 4), (2, 4, 4)]
    files = rct.InRun(c, w).pool_files(5)
    assert [len(open(f).readlines()) for f in files] == [r["corrected"] for r in out["rct"]]
    # a sampled candidate that could not be trained on (e.g. a literal <|im_start|>) is never written
    assert all(r["corrected"] + r["unusable"] == 4 and r["corrected"] for r in out["rct"])
    for f in files:
        assert all(text_problem(json.loads(line)["messages"][1]["content"]) is None for line in open(f))
    assert sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()) == [2, 4, 5]
    for step in (2, 4):  # saved right after the round, with the grown pool: the stream went on
        data = json.load(open(os.path.join(w, "checkpoints", str(step), "data", "metadata")))
        assert (data["epoch"], data["batch"]) == (0, step), data  # 8 records, batch 2: an epoch is 4+ batches
    assert len(pool(c, w, files)) == len(pool(c, w)) + sum(r["corrected"] for r in out["rct"])
    c.train.steps = 7  # resume from step 5: the pool already holds both rounds; rounds = 2, so none more
    again = recipe.run_stage(c, w)
    assert (again["start_step"], again["steps"], again["rct"]) == (5, 7, out["rct"])  # the rounds survive resume
    os.remove(files[0])
    c.train.steps = 9
    with pytest.raises(FileNotFoundError, match="RCT round 1"):
        recipe.run_stage(c, w)
    with pytest.raises(ConfigError, match="in-run RCT rounds are a step-end hook"):
        loop.run(c, w)


def test_rounds_inside_kd_are_refused():
    c = small_config()
    c.stage = "kd"
    R.override(c, {"teacher.preset": "tiny_qwen", "rct.every_steps": 2, "train.steps": 4})
    with pytest.raises(ConfigError, match="RCT rounds run inside SFT"):
        loop.run(c, "/nonexistent")
