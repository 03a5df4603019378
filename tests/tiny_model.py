"""A tiny random model saved as a training run saves its params (weights, tokenizer, how it is asked), for the
tests of the commands that load one: predict and serve."""

import os
import sys

from clinkd_jax import checkpoint
from clinkd_jax.data import text
from clinkd_jax.stage import StageContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo_eval  # noqa: E402

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def eval_config(**changes):
    """The demo's evaluation settings, shrunk for a test (what the tiny model is saved with)."""
    c = demo_eval.get_config()
    c.model.text_overrides = SMALL
    c.eval.max_new_tokens = c.eval.max_new_tokens_mii = 10
    c.eval.batch_size = 4
    c.eval.patch_buckets = (64,)
    c.eval.min_pixels, c.eval.max_pixels = 56 * 56, 112 * 112
    c.train.progress = False
    for k, v in changes.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def save(d: str, seed: int = 3) -> str:
    c = eval_config()
    c.seed = seed
    cfg, params = StageContext.of(c, "").load_model()
    checkpoint.save_params(d, params, cfg, assets_from=text.bundled_qwen2_tokenizer_dir(),
                           side_files=checkpoint.answer_settings_file(c))
    return d
