"""Model internals: KV-cache decoding, interchangeable attention kernels, remat, image-feature scatter."""

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
from jax.ad_checkpoint import print_saved_residuals

from clinkd_jax.data import positions
from clinkd_jax.hf_checkpoint import load_hf_checkpoint
from clinkd_jax.models import KVCache, Qwen2VL
from clinkd_jax.models.layers import REMAT_POLICIES
from clinkd_jax.models.qwen2vl import scatter_image_features

N_DECODE = 3  # every reference sample ends with >= 3 text tokens


@functools.lru_cache(maxsize=None)
def golden(name="gqa2_untied"):
    cfg, params = load_hf_checkpoint(f"{R.GOLDEN}/{name}")
    inputs, _ = R.load_golden(name)
    # left-align every sample (generation pads on the left)
    ids, mask = inputs["input_ids"].copy(), inputs["attention_mask"].copy()
    for b in range(len(ids)):
        n = int(mask[b].sum())
        real = ids[b][mask[b].astype(bool)]
        ids[b], mask[b] = 0, 0
        ids[b, -n:], mask[b, -n:] = real, 1
    x, _ = R.jax_inputs({**inputs, "input_ids": ids, "attention_mask": mask})
    return cfg, params, x


def test_kv_cache_prefill_then_decode_equals_full_forward():
    """Prefill L-3 tokens into a 32-slot cache, decode 3 one at a time: same logits and positions as one pass."""
    cfg, params, x = golden()
    model = Qwen2VL(cfg)
    full = np.asarray(jax.jit(model.apply)({"params": params}, **x)["logits"])
    length = x["input_ids"].shape[1]
    p = length - N_DECODE
    text_keys = ("input_ids", "attention_mask", "position_ids")
    prefix = {k: (v[:, :, :p] if k == "position_ids" else v[:, :p]) if k in text_keys else v for k, v in x.items()}
    pos_prefix, delta = positions.get_rope_index(prefix["input_ids"], np.array([g for gs in R.GRIDS for g in gs]),
                                                 prefix["attention_mask"], image_token_id=R.IMAGE)
    np.testing.assert_array_equal(pos_prefix, prefix["position_ids"])

    apply = jax.jit(model.apply)
    cache = KVCache.init(cfg.text, batch=3, max_length=32, dtype=jnp.float32)
    out = apply({"params": params}, **prefix, cache=cache)
    valid = prefix["attention_mask"].astype(bool)  # padded query rows are meaningless (see test_parity)
    np.testing.assert_allclose(np.asarray(out["logits"])[valid], full[:, :p][valid], atol=1e-5, rtol=0)
    cache = out["cache"]
    for step in range(N_DECODE):
        slot = p + step
        pos = positions.decode_position_ids(slot, delta)
        np.testing.assert_array_equal(pos, x["position_ids"][:, :, slot : slot + 1])
        out = apply({"params": params}, x["input_ids"][:, slot : slot + 1], np.ones((3, 1), np.int32), pos, cache=cache)
        cache = out["cache"]
        np.testing.assert_allclose(np.asarray(out["logits"][:, 0]), full[:, slot], atol=1e-5, rtol=0)
    assert int(cache.index) == length


def test_prefill_into_a_fresh_cache_attends_over_the_prompt_only():
    """A prefill into a fresh cache (`KVCache.init`: nothing written, index 0) attends over the prompt's T keys,
    not the buffer's S slots: the compiled prefill holds no (T, S) score tensor (the same prefill into a cache
    marked as written does, so the check can fail), and both give the same logits and cache entries for the
    prompt's tokens (atol 1e-5: the S - T masked slots only add exact zeros, sums of another order aside)."""
    cfg, params, x = golden()
    model = Qwen2VL(cfg)
    b, t = x["input_ids"].shape
    slots = 97  # S, a size no other dimension has
    fresh = KVCache.init(cfg.text, batch=b, max_length=slots, dtype=jnp.float32)
    assert fresh.fresh
    used = fresh.replace(fresh=False)
    prefill = jax.jit(lambda cache: model.apply({"params": params}, **x, cache=cache))
    hlo = {c.fresh: prefill.lower(c).compile().as_text() for c in (fresh, used)}
    assert not re.search(rf"f32\[[\d,]*{t},{slots}\]", hlo[True])
    assert re.search(rf"f32\[[\d,]*{t},{slots}\]", hlo[False])
    a, c = prefill(fresh), prefill(used)
    valid = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(a["logits"])[valid], np.asarray(c["logits"])[valid], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a["cache"].valid, c["cache"].valid)
    assert int(a["cache"].index) == int(c["cache"].index) == t
    written = np.asarray(a["cache"].valid)  # padding slots hold what fully masked query rows made: never read
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(getattr(a["cache"], name))[:, written],
                                   np.asarray(getattr(c["cache"], name))[:, written], atol=1e-5, rtol=0, err_msg=name)
    assert not a["cache"].fresh


@pytest.mark.parametrize("impl", ["jax"])
def test_attention_impls_agree(impl):
    """jax.nn.dot_product_attention (XLA backend on CPU) gives the same logits as our einsum path."""
    cfg, params, x = golden("gqa4_tied")
    ref = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": params}, **x)["logits"])
    other = np.asarray(jax.jit(Qwen2VL(cfg, attention_impl=impl).apply)({"params": params}, **x)["logits"])
    valid = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(other[valid], ref[valid], atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                    reason="cuDNN attention needs an NVIDIA GPU (bench/device_check.sh runs this test there)")
def test_cudnn_attention_agrees_with_xla_in_bfloat16():
    """model.attention=cudnn (flash attention, bfloat16 only) against the XLA path at the same dtype, on the
    left-padded golden batch. Both round q/k/v and every layer's output to bfloat16 (8-bit mantissa): logits of
    size ~1 agree to a few bfloat16 steps, 3e-2; a wrong mask or head layout moves them by O(1)."""
    cfg, params, x = golden("gqa4_tied")
    logits = {impl: np.asarray(jax.jit(Qwen2VL(cfg, dtype="bfloat16", attention_impl=impl).apply)(
        {"params": params}, **x)["logits"], np.float32) for impl in ("xla", "cudnn")}
    valid = x["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits["cudnn"][valid], logits["xla"][valid], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("loop", ["per_head", "batched"])
def test_vision_attention_per_head_and_in_query_blocks_equals_one_pass(loop):
    """model.attention_loop / vision_query_block: the vision tower's output is that of one batched pass
    over all query rows, on rows holding several images and padding slots, pair by pair and for a block that
    divides the row and one that does not (a shorter last block). Each query row's arithmetic is the same;
    XLA may tile the smaller matmuls differently, so float32 rounding of ~1e-6 on outputs of size ~1 is
    allowed (1e-5). A mask taken from the wrong sample or rows would be off by O(1)."""
    cfg, params, x = golden()
    vis = {k: x[k] for k in ("pixel_values", "vision_position_ids", "vision_segment_ids")}
    seg = vis["vision_segment_ids"]
    assert seg.max() > 1 and (seg == 0).any() and len({r.tobytes() for r in seg}) > 1  # rows differ

    def tower(loop, block):
        model = Qwen2VL(cfg, attention_loop=loop, vision_query_block=block)
        return np.asarray(jax.jit(functools.partial(model.apply, method="vision_tower"))({"params": params}, **vis))

    whole, n = tower("batched", 0), vis["pixel_values"].shape[1]
    for block in (0, n // 4, n // 3 + 1) if loop == "per_head" else (n // 4, n // 3 + 1):
        np.testing.assert_allclose(tower(loop, block), whole, atol=1e-5, rtol=0)


def test_unknown_attention_impl():
    cfg, params, x = golden()
    with pytest.raises(ValueError, match="attention impl 'flash2' is not one of"):
        Qwen2VL(cfg, attention_impl="flash2").apply({"params": params}, **x)


@pytest.mark.parametrize("variant", [{"remat": r} for r in REMAT_POLICIES[1:]] + [{"scan_unroll": 2}] + [
    {"attention_loop": "per_head"}, {"attention_loop": "per_head", "vision_query_block": 24}])
def test_remat_unrolling_and_attention_loops_same_loss_and_grads(variant):
    """Rematerialisation, unrolled layer scans and the vision attention's loops change memory and schedule, not
    math; the reference is the batched vision attention, differentiated by JAX (the per-head loop has its
    own backward, models.attention._attend_2d). The other variants run with the default loop ("auto")."""
    cfg, params, x = golden()

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, **x)["logits"] ** 2)

    base = jax.jit(jax.value_and_grad(functools.partial(loss, Qwen2VL(cfg, attention_loop="batched"))))(params)
    other = jax.jit(jax.value_and_grad(functools.partial(loss, Qwen2VL(cfg, **variant))))(params)
    np.testing.assert_allclose(base[0], other[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(base[1]), jax.tree.leaves(other[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_remat_policies_keep_what_their_names_say():
    """What each policy keeps for the backward pass (jax.ad_checkpoint.print_saved_residuals): fewer bytes
    the further down the list a policy sits (none > minimal_with_context > minimal > full), and
    minimal_with_context keeps exactly one (layers, B, T, heads, head_dim) array more than minimal: the
    attention output, tagged "context" (the scan hides the tag's name, not the shape)."""
    cfg, params, x = golden()
    t = cfg.text
    context = (t.num_hidden_layers, *x["input_ids"].shape, t.num_attention_heads, t.head_dim)

    def kept(policy):  # shapes and bytes of what the backward pass keeps
        f = lambda p: jnp.sum(Qwen2VL(cfg, remat=policy).apply({"params": p}, **x)["logits"] ** 2)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(f, params)
        arrays = [(int(bits) // 8, tuple(int(d) for d in dims.split(",") if d))
                  for bits, dims in re.findall(r"^[a-z]+(\d+)\[([\d,]*)\]", out.getvalue(), re.M)]
        return [shape for _, shape in arrays], sum(n * int(np.prod(shape)) for n, shape in arrays)

    (none, s0), (with_ctx, s1), (minimal, s2), (_, s3) = map(kept, ("none", "minimal_with_context", "minimal", "full"))
    assert s0 > s1 > s2 > s3, (s0, s1, s2, s3)
    assert with_ctx.count(context) == minimal.count(context) + 1, (context, with_ctx, minimal)


def test_return_hidden_then_logits_equals_logits():
    cfg, params, x = golden()
    model = Qwen2VL(cfg)
    hidden = model.apply({"params": params}, **x, return_hidden=True)["hidden"]
    via_hidden = model.apply({"params": params}, hidden, method=Qwen2VL.logits)
    direct = model.apply({"params": params}, **x)["logits"]
    np.testing.assert_array_equal(np.asarray(via_hidden), np.asarray(direct))


def test_scatter_image_features_in_order():
    emb = jnp.zeros((2, 6, 1))
    is_img = jnp.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], bool)
    feats = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1)
    out = scatter_image_features(emb, is_img, feats)[..., 0]
    assert out.tolist() == [[0, 1, 2, 0, 3, 0], [0] * 6]


def test_text_only_forward_skips_vision():
    cfg, params, x = golden()
    text_keys = ("input_ids", "attention_mask", "position_ids")
    text = {k: x[k][2:] if k != "position_ids" else x[k][:, 2:] for k in text_keys}
    vision = {k: v[2:] for k, v in x.items() if k.startswith(("pixel", "vision"))}
    with_vision = Qwen2VL(cfg).apply({"params": params}, **vision, **text)
    without = Qwen2VL(cfg).apply({"params": params}, **text)
    valid = text["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(without["logits"])[valid], np.asarray(with_vision["logits"])[valid],
                               atol=1e-6)


def _padded_to(x, length, patches):
    """The golden batch with extra right padding up to `length` tokens and `patches` vision slots."""
    pad = length - x["input_ids"].shape[1]
    ids = np.pad(x["input_ids"], ((0, 0), (0, pad)))
    mask = np.pad(x["attention_mask"], ((0, 0), (0, pad)))
    pos, _ = positions.get_rope_index(ids, np.array([g for gs in R.GRIDS for g in gs]), mask, image_token_id=R.IMAGE)
    vpad = patches - x["pixel_values"].shape[1]
    return {
        "input_ids": ids, "attention_mask": mask, "position_ids": pos,
        "pixel_values": np.pad(x["pixel_values"], ((0, 0), (0, vpad), (0, 0))),
        "vision_position_ids": np.pad(x["vision_position_ids"], ((0, 0), (0, vpad), (0, 0))),
        "vision_segment_ids": np.pad(x["vision_segment_ids"], ((0, 0), (0, vpad))),
    }


def test_splash_attention_matches_xla():
    """The TPU splash kernel (Pallas interpret mode on CPU) against the einsum path: 128 tokens and
    128 patches (one block), segment ids for images and padding, causal for the LLM, GQA 4:2.
    Also on a 2x2x2 mesh, where it runs under shard_map. Tolerance 1e-4: the kernel uses an online
    (blockwise) softmax, a different but equally exact float32 summation order."""
    from clinkd_jax import sharding

    cfg, params, x = golden()
    x = _padded_to(x, 128, 128)
    valid = x["attention_mask"].astype(bool)
    ref = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": params}, **x)["logits"])
    splash = Qwen2VL(cfg, attention_impl="splash")
    got = np.asarray(jax.jit(splash.apply)({"params": params}, **x)["logits"])
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)
    mesh = sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4])
    _, sharded = load_hf_checkpoint(f"{R.GOLDEN}/gqa2_untied", mesh=mesh)
    with sharding.use_mesh(mesh):
        got = np.asarray(jax.jit(splash.apply)({"params": sharded}, **x)["logits"])
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_bfloat16_forward_tracks_float32():
    """bf16 params and compute (the accelerator setting) stay close to float32. bf16 keeps ~3 significant
    digits and the error compounds over layers, so the bound is loose: max |diff| <= 0.1 on logits of
    magnitude ~4, with > 0.9 top-1 agreement; a real bug (wrong cast, overflow) blows far past that."""
    cfg, params, x = golden()
    ref = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": params}, **x)["logits"])
    _, bf = load_hf_checkpoint(f"{R.GOLDEN}/gqa2_untied", dtype="bfloat16")
    out = jax.jit(Qwen2VL(cfg, dtype="bfloat16", param_dtype="bfloat16").apply)({"params": bf}, **x)["logits"]
    assert out.dtype == jnp.float32
    valid = x["attention_mask"].astype(bool)
    got = np.asarray(out)[valid]
    assert np.abs(got - ref[valid]).max() < 0.1
    assert (got.argmax(-1) == ref[valid].argmax(-1)).mean() > 0.9


def test_splash_pads_any_length_and_takes_the_prefill(caplog):
    """Lengths that are not a multiple of the kernel's 128 block (the golden inputs as they are) are padded inside
    the kernel with segment id 0, and a prefill into a fresh KV cache (self-attention over the prompt) takes the
    kernel too: the same logits on real tokens and the same cache as the einsum path; a decode step over the cache
    says it uses attention 'xla'. Tolerance 1e-4 as above (blockwise softmax)."""
    from clinkd_jax.models.llm import KVCache

    cfg, params, x = golden()
    b, length = x["input_ids"].shape
    assert length % 128 and x["pixel_values"].shape[1] % 128  # not a block multiple
    valid = x["attention_mask"].astype(bool)
    ref_model, splash = Qwen2VL(cfg), Qwen2VL(cfg, attention_impl="splash")
    ref = np.asarray(jax.jit(ref_model.apply)({"params": params}, **x)["logits"])
    got = np.asarray(jax.jit(splash.apply)({"params": params}, **x)["logits"])
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)

    def prefill(model):
        cache = KVCache.init(cfg.text, b, length + 4, jnp.float32)
        return jax.jit(lambda p, x: model.apply({"params": p}, **x, cache=cache))(params, x)

    want, have = prefill(ref_model), prefill(splash)
    np.testing.assert_allclose(np.asarray(have["logits"])[valid], np.asarray(want["logits"])[valid], atol=1e-4, rtol=0)
    for name in ("k", "v"):  # (layers, B, S, K, H): the prompt's slots
        w, h = (np.asarray(getattr(o["cache"], name))[:, :, :length] for o in (want, have))
        np.testing.assert_allclose(h[:, valid], w[:, valid], atol=1e-4, rtol=0)
    with caplog.at_level("INFO", logger="clinkd_jax.models"):
        one = {k: v for k, v in x.items() if not k.startswith(("pixel", "vision"))}
        one = {"input_ids": one["input_ids"][:, :1], "attention_mask": one["attention_mask"][:, :1],
               "position_ids": one["position_ids"][:, :, :1]}
        jax.jit(lambda p: splash.apply({"params": p}, **one, cache=have["cache"]))(params)
    assert "use attention 'xla'" in caplog.text or "uses attention 'xla'" in caplog.text
