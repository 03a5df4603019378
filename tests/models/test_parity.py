"""Our Qwen2-VL / Qwen2.5-VL against transformers' PyTorch models of the same family on tiny random configs.

Tolerance: float32 on CPU, max abs difference <= 1e-4 on logits (values of order 1-5) and on the vision
tower / merger outputs. The observed difference is ~5e-6 (accumulation-order noise); a wrong rotary
layout, mask or weight transpose gives differences of order 1. Logits are compared at real (unpadded)
positions: padded query rows are meaningless in both implementations and masked out of every loss.
"""

import functools

import jax
import numpy as np
import pytest
import reference as R

from clinkd_jax.hf_checkpoint import load_hf_checkpoint
from clinkd_jax.models import Qwen2VL

ATOL = 1e-4


def run_ours(cfg, params, x):
    """Our logits, vision tower and merger outputs (and DeepStack features) for inputs `x`."""
    model = Qwen2VL(cfg)
    variables = {"params": params}
    vis_args = (x["pixel_values"], x["vision_position_ids"], x["vision_segment_ids"])
    method = lambda m: jax.jit(functools.partial(model.apply, method=m))
    out = {"logits": np.asarray(jax.jit(model.apply)(variables, **x)["logits"]),
           "vision_hidden": np.asarray(method(Qwen2VL.vision_tower)(variables, *vis_args)),
           "vision_merged": np.asarray(method(Qwen2VL.vision_features)(variables, *vis_args)),
           "position_ids": x["position_ids"]}
    if cfg.vision.deepstack_visual_indexes:
        out["deepstack"] = np.asarray(method(Qwen2VL.deepstack_features)(variables, *vis_args))
    return out


@functools.lru_cache(maxsize=None)
def ours(name):
    """Our outputs for a golden checkpoint, computed once per config."""
    cfg, params = load_hf_checkpoint(f"{R.GOLDEN}/{name}")
    inputs, _ = R.load_golden(name)
    return run_ours(cfg, params, R.jax_inputs(inputs)[0])


def assert_matches(mine, ref, mask):
    valid = mask.astype(bool)
    np.testing.assert_allclose(mine["logits"][valid], ref["logits"][valid], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(mine["position_ids"], ref["position_ids"])
    for key, per_token in (("vision_hidden", 1), ("vision_merged", 4)):
        for b, ref_b in enumerate(R.per_sample_vision(ref[key], per_token)):
            np.testing.assert_allclose(mine[key][b, : len(ref_b)], ref_b, atol=ATOL, rtol=0,
                                       err_msg=f"{key} sample {b}")
    assert ("deepstack" in mine) == ("deepstack" in ref)
    for k, ref_k in enumerate(ref.get("deepstack", ())):  # Qwen3-VL: each DeepStack merger's output
        for b, ref_b in enumerate(R.per_sample_vision(ref_k, 4)):
            np.testing.assert_allclose(mine["deepstack"][k, b, : len(ref_b)], ref_b, atol=ATOL, rtol=0,
                                       err_msg=f"deepstack {k} sample {b}")
    # the scale check keeps this honest: near-zero reference logits would make any model "match"
    assert np.abs(ref["logits"][valid]).max() > 1.0


@pytest.mark.parametrize("name", sorted(R.CONFIGS))
def test_matches_golden(name):
    inputs, golden = R.load_golden(name)
    assert_matches(ours(name), golden, inputs["attention_mask"])


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(R.CONFIGS))
def test_matches_transformers_live(name):
    """Live: transformers loads the same directory and runs the same batch now; also proves the
    committed golden files are still what this transformers version computes."""
    inputs, golden = R.load_golden(name)
    model = R.hf_model_class(name).from_pretrained(f"{R.GOLDEN}/{name}", attn_implementation="eager").eval()
    live = R.hf_outputs(model, inputs)
    assert_matches(ours(name), live, inputs["attention_mask"])
    for key in golden:
        np.testing.assert_allclose(golden[key], live[key], atol=1e-5, rtol=0, err_msg=f"golden {key} is stale")


FRESH = {  # configs in no golden file
    # 8 query heads over 2 KV heads, mrope [2, 2, 4], tied head
    "qwen2_vl": dict(text=dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, mrope_section=[2, 2, 4],
                               rope_theta=5e5, tie=True),
                     vision=dict(depth=3, embed_dim=40, num_heads=2, mlp_ratio=3)),
    # windows of 2x2 merged tokens in the middle block only, 4 query heads per KV head, untied head
    "qwen2_5_vl": dict(family="qwen2_5_vl",
                       text=dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                 mrope_section=[4, 2, 2], rope_theta=2e5, tie=False),
                       vision=dict(depth=3, embed_dim=40, num_heads=2, intermediate_size=72, window_size=56,
                                   fullatt_block_indexes=[0, 2])),
    # DeepStack indexes out of order (transformers feeds the LLM in block order, each block through the merger
    # of its place in the list); a 5x5 position table; head width 24 (not 128 / 8)
    "qwen3_vl": dict(family="qwen3_vl",
                     text=dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=24,
                               mrope_section=[4, 4, 4], rope_theta=3e5, tie=False),
                     vision=dict(depth=3, embed_dim=40, num_heads=2, intermediate_size=72, num_position_embeddings=25,
                                 deepstack_visual_indexes=[2, 0])),
}


@pytest.mark.torch
@pytest.mark.parametrize("family", sorted(FRESH))
def test_fresh_random_config_live(tmp_path, family):
    R.CONFIGS["fresh_gqa4"] = FRESH[family]
    try:
        model = R.build_hf_model("fresh_gqa4", seed=7)
        model.save_pretrained(tmp_path)
        batch = R.make_batch(seed=3, patch=R.patch_size("fresh_gqa4"))
        live = R.hf_outputs(model, batch)
        cfg, params = load_hf_checkpoint(str(tmp_path))
        mine = run_ours(cfg, params, R.jax_inputs(batch)[0])
        assert_matches(mine, live, batch["attention_mask"])
    finally:
        del R.CONFIGS["fresh_gqa4"]
