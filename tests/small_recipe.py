"""A recipe small enough for a test, with a stage of every kind and every file a recipe writes: a teacher trained
and evaluated while it trains, an RCT stage, a student distilled (on the corrections too), an SFT with an RCT round
inside the run, and an evaluation. `--config=tests/small_recipe.py` on the command line; `get_config()` in tests."""

import os
import sys

from ml_collections import ConfigDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo_train  # noqa: E402

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
SETTINGS = {"data.batch_size": 2, "data.text_buckets": (192,), "data.patch_buckets": (256,),
            "data.max_pixels": 112 * 112, "data.num_epochs": None, "train.progress": False,
            "checkpoint.async_save": False, "checkpoint.save_every": 2, "train.total_steps_hint": 10,
            "eval.limit": 2, "eval.max_new_tokens": 4, "eval.max_new_tokens_mii": 4, "eval.tasks": ("VG", "RO"),
            "eval.patch_buckets": (256,), "eval.max_pixels": 112 * 112, "eval.min_pixels": 56 * 56}


def base():
    c = demo_train.get_config()
    c.model.text_overrides = SMALL
    c.model.compact_vocab = "data"  # shared by every stage (kd checks the teacher's against the student's)
    for key, value in SETTINGS.items():
        group, field = key.split(".")
        c[group][field] = value
    return c


def get_config():
    """teacher (sft, evaluated at step 2) -> rct (the teacher's answers corrected) -> kd (a fresh one-layer student,
    the corrections added to its data) -> sft (an RCT round after step 1, the teacher correcting) -> eval."""
    c = base()
    c.rct.num_items, c.rct.samples, c.rct.max_new_tokens, c.rct.batch_size = 4, 2, 4, 4
    c.stages = ("teacher", "rct", "kd", "sft", "eval")
    c.stage_settings = ConfigDict({
        "teacher": {"stage": "sft", "train": {"steps": 3}, "eval": {"every_steps": 2}},
        "rct": {"stage": "rct", "model_from": "teacher"},
        "kd": {"stage": "kd", "teacher_from": "teacher", "teacher": {"dtype": "float32"}, "rct_from": "rct",
               "model": {"preset": "tiny_qwen", "text_overrides": {"num_hidden_layers": 1}}, "train": {"steps": 2}},
        "sft": {"stage": "sft", "teacher_from": "teacher", "train": {"steps": 3},
                "rct": {"every_steps": 1, "rounds": 1}},
        "eval": {"stage": "eval"},
    })
    return c
