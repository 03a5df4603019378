"""Model families: the family as a property of the config, and Qwen2.5-VL's window attention in isolation
(its parity with transformers is in test_parity / test_generate / test_convert, over the q25_* golden files)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinkd_jax.data import positions
from clinkd_jax.models import attention, window
from clinkd_jax.models.config import ConfigError, Qwen2VLConfig, as_family
from clinkd_jax.models.presets import PRESETS, tiny
from clinkd_jax.models.vision import VisionTransformer


def test_presets_round_trip_through_their_family_config_json():
    for name, preset in PRESETS.items():
        cfg = preset()
        d = cfg.to_hf_dict()
        assert d["model_type"] == cfg.family, name
        assert Qwen2VLConfig.from_hf_dict(d) == cfg, name


def test_as_family_builds_the_qwen25_tower_and_back():
    q25 = as_family(tiny(), "qwen2_5_vl")
    v = q25.vision
    assert (q25.family, v.norm, v.mlp, v.window_size) == ("qwen2_5_vl", "rms_norm", "gated", 112)
    assert v.fullatt_block_indexes == (1,) and v.mlp_dim == tiny().vision.mlp_dim  # a windowed block stays
    assert as_family(q25, "qwen2_vl") == tiny()
    with pytest.raises(ConfigError, match="model.family='qwen4_vl' is not one of"):
        as_family(tiny(), "qwen4_vl")
    with pytest.raises(ConfigError, match="family 'qwen2_vl' cannot hold vision.norm='rms_norm'"):
        tiny().replace(vision=v)  # a Qwen2-VL config.json cannot hold a Qwen2.5-VL tower


def test_as_family_builds_qwen3_vl_and_back():
    """Qwen3-VL from a preset: 16 px patches with a bias, a 48 x 48 position table, DeepStack from the ends of the
    tower's first quarters (at most one per LLM layer), the Qwen3 LLM with the preset's head width."""
    q3 = as_family(tiny(), "qwen3_vl")
    v, t = q3.vision, q3.text
    assert (v.patch_size, v.patch_dim, v.patch_bias, v.position_side, v.deepstack_visual_indexes) == (
        16, 1536, True, 48, (0, 1))
    assert (t.head_dim, t.qk_norm, t.attention_bias, t.mrope_interleaved) == (tiny().text.head_dim, True, False, True)
    assert as_family(q3, "qwen2_vl") == tiny() and as_family(as_family(q3, "qwen2_5_vl"), "qwen3_vl") == q3
    deep = as_family(tiny().replace(vision=dataclasses.replace(tiny().vision, depth=24)), "qwen3_vl")
    assert deep.vision.deepstack_visual_indexes == (5, 11)  # (5, 11, 17) as in Qwen3-VL-2B, cut to 2 LLM layers
    with pytest.raises(ConfigError, match="family 'qwen3_vl' cannot hold text.qk_norm=False"):
        q3.replace(text=dataclasses.replace(t, qk_norm=False))


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_deepstack_holds_its_k_block_outputs_not_one_per_block(grad):
    """DeepStack costs the tower K kept activations whatever its depth (the blocks write their slot in the scan);
    collecting every block's output and picking K afterwards cost one activation per block. Compiled on CPU,
    temporaries measured by XLA: the DeepStack extra over the same tower without it, at depths 8 and 16."""
    q3, rows, side = as_family(tiny(), "qwen3_vl"), 2, 16
    pos = jnp.broadcast_to(jnp.stack(jnp.meshgrid(jnp.arange(side), jnp.arange(side), indexing="ij"), -1).reshape(
        1, side * side, 2), (rows, side * side, 2))
    seg = jnp.ones((rows, side * side), jnp.int32)
    px = jnp.zeros((rows, side * side, q3.vision.patch_dim))
    act = px.shape[0] * px.shape[1] * q3.vision.embed_dim * 4  # one (B, N, E) float32 activation, bytes

    def temp(depth, indexes):
        tower = VisionTransformer(dataclasses.replace(q3.vision, depth=depth, deepstack_visual_indexes=indexes),
                                  out_dim=q3.text.hidden_size)
        params = jax.eval_shape(tower.init, jax.random.key(0), px, pos, seg)

        def out(p):
            x, deep = tower.apply(p, px, pos, seg)
            return jnp.sum(x) + (0.0 if deep is None else jnp.sum(deep))

        fn = jax.jit(jax.grad(out) if grad else out)
        return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

    k = 2
    extra = {depth: temp(depth, (1, 3)) - temp(depth, ()) for depth in (8, 16)}
    assert extra[16] - extra[8] < act / 2, extra  # 8 more blocks, not 8 more activations
    # The (K, B, N, E) buffer, plus at most one copy of it that the compiler may make for the scan's while loop
    # (jax 0.10.2: a copy of one slot, K + 1 activations; 0.12.1: of the whole buffer, 2K), plus a few scalars
    # (8 bytes on both: the loop's slot index); 1 KiB of slack for such scalars, a 64th of one activation.
    # Collecting every block's output would cost `depth` activations (8 or 16) and fail both bounds.
    assert k * act <= extra[8] and extra[16] <= 2 * k * act + 1024, extra


def _packed(grids, num_patches):
    rng = np.random.default_rng(0)
    samples = [[(rng.standard_normal((int(np.prod(g)), 4)).astype(np.float32), g) for g in gs] for gs in grids]
    return positions.pack_vision_inputs(samples, num_patches)


def test_window_order_makes_each_window_contiguous_and_unsorts():
    # images of 8x12, 6x6 and 4x4 patches; 4-patch windows: partial windows at the right and bottom edges
    v = _packed([[(1, 8, 12), (1, 6, 6)], [(1, 4, 4)]], 160)
    perm, ids = window.window_order(jnp.asarray(v["vision_position_ids"]), jnp.asarray(v["vision_segment_ids"]), 4, 4)
    perm, ids = np.asarray(perm), np.asarray(ids)
    for b in range(2):
        assert sorted(perm[b]) == list(range(160))
        real = ids[b][ids[b] > 0]
        changes = np.flatnonzero(np.diff(real)) + 1
        runs = np.split(real, changes)
        assert len({r[0] for r in runs}) == len(runs), "a window appears in two runs"
        assert max(len(r) for r in runs) <= 16 and (ids[b][len(real):] == 0).all()  # padding last
    # 8x12 image: 2 x 3 windows; 6x6: 2 x 2 (partial); 4x4: one
    assert len(np.unique(ids[0][ids[0] > 0])) == 6 + 4 and len(np.unique(ids[1][ids[1] > 0])) == 1
    x = jnp.arange(2 * 160, dtype=jnp.float32).reshape(2, 160, 1)
    np.testing.assert_array_equal(window.unsort(window.gather(x, jnp.asarray(perm)), jnp.asarray(perm)), x)


def test_window_attention_equals_dense_masked_attention_without_an_n_by_n_array():
    """Against attention over all N keys with a (window == window) mask, in float32 (same sums over the same
    keys, another order: 1e-5), with N not a multiple of the block; and no (N, N)-sized array in the program."""
    v = _packed([[(1, 8, 12), (1, 6, 6)], [(1, 4, 4), (1, 10, 6)]], 200)
    perm, ids = window.window_order(jnp.asarray(v["vision_position_ids"]), jnp.asarray(v["vision_segment_ids"]), 4, 4)
    q, k, val = (jax.random.normal(jax.random.key(i), (2, 200, 3, 8)) for i in range(3))
    got = window.window_attention(q, k, val, ids, block=16)
    mask = ((ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] > 0))[:, None]
    want = attention.dot_product_attention(q, k, val, mask, impl="xla")
    real = np.asarray(ids > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)

    n = 4096
    jaxpr = jax.make_jaxpr(lambda q, k, v, ids: window.window_attention(q, k, v, ids, 64))(
        *(jnp.zeros((1, n, 2, 8)),) * 3, jnp.zeros((1, n), jnp.int32))
    biggest = max(np.prod(var.aval.shape) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars)
    assert biggest <= n * 3 * 64 * 2, biggest  # (queries, 3 blocks of keys, heads), not (n, n)


def test_a_teacher_with_another_tokenizer_is_refused_by_name(tmp_path):
    """Qwen2-VL and Qwen2.5-VL share a tokenizer, so either teaches the other; a checkpoint whose tokenizer
    (tokenizer.json vocabulary) or special ids differ is refused before any weight is read."""
    from ml_collections import ConfigDict

    from clinkd_jax.model_source import ModelSource, same_inputs, same_tokenizer

    def ckpt(name, vocab):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
        return str(d)

    same, other = {"a": 0, "b": 1}, {"a": 0, "c": 1}
    c = ConfigDict({"model": {"hf_dir": ckpt("student", same), "orbax_dir": ""},
                    "teacher": {"hf_dir": ckpt("teacher", same), "orbax_dir": ""}})
    def check():
        same_tokenizer(ModelSource("model", "hf_dir", c.model.hf_dir),
                       ModelSource("teacher", "hf_dir", c.teacher.hf_dir), "teacher")

    check()
    c.teacher.hf_dir = ckpt("other", other)
    with pytest.raises(ConfigError, match=r"teacher: its tokenizer \(.*other/tokenizer.json\) is not the model's"):
        check()
    student = as_family(tiny(), "qwen2_5_vl")
    same_inputs(student, tiny(), "the teacher")  # Qwen2-VL teacher, Qwen2.5-VL student
    with pytest.raises(ConfigError, match="the teacher has image_token_id=7 but the model has 250"):
        same_inputs(student, tiny().replace(image_token_id=7), "the teacher")
    # Qwen3-VL reads 16 px patches normalised to [-1, 1]: no batch serves it and a Qwen2-VL teacher together
    with pytest.raises(ConfigError, match=r"the teacher \(qwen2_vl: 14 px patches.*\) reads images differently from "
                                          r"the model \(qwen3_vl: 16 px patches"):
        same_inputs(as_family(tiny(), "qwen3_vl"), tiny(), "the teacher")
