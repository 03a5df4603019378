"""Jitted generation against transformers' `generate`, and its own contract (stop, pad, sampling, compile
count, MCG-RoPE decode positions, sharding).

Greedy parity is exact token equality: float32 on CPU; the tiny random models have logit gaps far above
the ~5e-6 forward differences measured in test_parity, so a tie flip would be a real bug.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R

from clinkd_jax import sharding
from clinkd_jax.hf_checkpoint import load_hf_checkpoint
from clinkd_jax.infer import generate as G
from clinkd_jax.models import KVCache, Qwen2VL


@functools.lru_cache(maxsize=None)
def golden_model(name):
    cfg, params = load_hf_checkpoint(f"{R.GOLDEN}/{name}")
    return Qwen2VL(cfg), params


def sampling(stops, **kw):
    return G.SamplingConfig(max_new_tokens=R.GEN_NEW_TOKENS, stop_token_ids=tuple(int(s) for s in stops),
                            pad_token_id=0, **kw)


def ours_greedy(name, stops, gaps=(1, 1)):
    model, params = golden_model(name)
    batch = R.jax_generation_batch(R.generation_prompts(patch=R.patch_size(name)), gaps)
    return G.Generator(model, params)(batch, sampling(stops)), batch


@pytest.mark.parametrize("name", sorted(R.CONFIGS))
def test_greedy_equals_golden_transformers_generate(name):
    ref = np.load(f"{R.GOLDEN}/{name}/generate.npz")
    tokens, _ = ours_greedy(name, ref["stop_token_ids"])
    np.testing.assert_array_equal(tokens, ref["tokens"])
    # the golden run is meant to exercise early stopping: some rows stop, others run to the limit
    lengths = [len(r) for r in G.trim(tokens, ref["stop_token_ids"])]
    assert min(lengths) < R.GEN_NEW_TOKENS


@pytest.mark.torch
@pytest.mark.parametrize("name", ["gqa2_untied", "mha_head32", "q25_win56_gqa2", "q3_ds2_gqa2"])
def test_greedy_equals_live_transformers_generate(name):
    ref = R.hf_generation_reference(R.build_hf_model(name, seed=0))
    tokens, _ = ours_greedy(name, ref["stop_token_ids"])
    np.testing.assert_array_equal(tokens, ref["tokens"])
    golden = np.load(f"{R.GOLDEN}/{name}/generate.npz")  # the committed files are still what transformers gives
    np.testing.assert_array_equal(ref["tokens"], golden["tokens"])


def test_cached_decode_equals_full_forward_with_mcg_gaps():
    """With MCG-RoPE gaps (2, 2), which transformers cannot express: every generated token is the
    argmax of an uncached forward over prompt + tokens so far, with positions continuing at max + 1."""
    name = "gqa2_untied"
    model, params = golden_model(name)
    tokens, batch = ours_greedy(name, [255], gaps=(2, 2))
    plain, _ = ours_greedy(name, [255], gaps=(1, 1))
    assert not np.array_equal(tokens, plain), "the gaps should change what a random model says"
    n = tokens.shape[1]
    ids = np.concatenate([batch["input_ids"], tokens], axis=1)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens, np.int32)], axis=1)
    p = batch["input_ids"].shape[1]
    new_pos = (p + np.arange(n))[None, :] + batch["decode_offsets"][:, None]
    pos = np.concatenate([batch["position_ids"], np.broadcast_to(new_pos, (3, *new_pos.shape))], axis=2)
    vision = {k: batch[k] for k in G.VISION_KEYS}
    logits = np.asarray(model.apply({"params": params}, ids, mask, pos, **vision)["logits"])
    np.testing.assert_array_equal(logits[:, p - 1 : p + n - 1].argmax(-1), tokens)
    # the first new position is one past the largest prompt position of each row
    for i in range(len(tokens)):
        real = batch["attention_mask"][i].astype(bool)
        assert new_pos[i, 0] == batch["position_ids"][:, i, real].max() + 1


@pytest.mark.parametrize("name", sorted(R.CONFIGS))
def test_unrolled_decode_equals_scanned_decode(name):
    """model.decode_layers: "scan" (over the stacked layers; the default off CPU) gives transformers' tokens as
    "unrolled" (per-layer weights and cache buffers, LM head as (V, D) rows; the CPU default, which the tests
    above run) does, and one decode step of each gives the same logits and cache to float32 rounding (1e-5:
    sums of another order)."""
    model, params = golden_model(name)
    batch = R.jax_generation_batch(R.generation_prompts(patch=R.patch_size(name)))
    ref = np.load(f"{R.GOLDEN}/{name}/generate.npz")
    scanned = G.Generator(model.clone(decode_layers="scan"), params)(batch, sampling(ref["stop_token_ids"]))
    np.testing.assert_array_equal(scanned, ref["tokens"])

    b, p = batch["input_ids"].shape
    vision = {k: batch[k] for k in G.VISION_KEYS}
    prefill = jax.jit(lambda params: model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["position_ids"], **vision,
        cache=KVCache.init(model.cfg.text, b, p + 1, jnp.float32), return_hidden=True)["cache"])(params)
    step = (ref["tokens"][:, :1], np.ones((b, 1), np.int32),
            np.broadcast_to((p + batch["decode_offsets"])[None, :, None], (3, b, 1)))

    @functools.partial(jax.jit, static_argnums=0)
    def decode_step(layout, params, cache):
        decoder, decoder_params, logits = G.decode_model(model.clone(decode_layers=layout), params)
        assert decoder.stacked_layers == (layout == "scan")
        cache = cache if layout == "scan" else cache.per_layer()
        o = decoder.apply({"params": decoder_params}, *step, cache=cache, return_hidden=True)
        merge = lambda x: jnp.stack(x).swapaxes(2, 3) if isinstance(x, tuple) else x  # per layer -> stacked
        return logits(o["hidden"][:, -1]), merge(o["cache"].k), merge(o["cache"].v)

    for a, b_ in zip(decode_step("unrolled", params, prefill), decode_step("scan", params, prefill)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-5)


def test_stop_pad_and_filler_rows():
    model, params = golden_model("gqa4_tied")
    batch = R.jax_generation_batch(R.generation_prompts())
    for k in ("input_ids", "attention_mask", "decode_offsets"):  # make row 3 a batch filler (no prompt)
        batch[k][3] = 0 if k != "input_ids" else batch[k][3]
    batch["position_ids"][:, 3] = 0
    free = G.Generator(model, params)(batch, sampling([255]))
    stop = int(free[0, 2])
    tokens = G.Generator(model, params)(batch, sampling([stop]))
    first = int(np.flatnonzero(free[0] == stop)[0])
    np.testing.assert_array_equal(tokens[0, : first + 1], free[0, : first + 1])
    assert (tokens[0, first + 1 :] == 0).all()
    assert G.trim(tokens, [stop])[0][-1] == stop
    assert tokens[3, 0] == free[3, 0] and (tokens[3, 1:] == 0).all()  # filler: one token, then pad


def test_sampling_rules():
    logits = jnp.asarray([[4.0, 3.0, 1.0, -2.0, 0.5]] * 512)
    rng = jax.random.key(0)
    greedy = G.sample_token(logits, rng, G.SamplingConfig())
    assert (np.asarray(greedy) == 0).all()
    assert (np.asarray(G.sample_token(logits, rng, G.SamplingConfig(temperature=1.0, top_k=1))) == 0).all()
    # top_p=0.9: softmax = [.705, .259, .035, .002, .021] -> nucleus {0, 1} (0.705 < 0.9 <= 0.964)
    drawn = np.asarray(G.sample_token(logits, rng, G.SamplingConfig(temperature=1.0, top_p=0.9)))
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 1).mean() - 0.259 / 0.964) < 0.06  # binomial sd at n=512 is ~0.02
    full = np.asarray(G.sample_token(logits, rng, G.SamplingConfig(temperature=1.0)))
    assert len(set(full.tolist())) >= 4
    with pytest.raises(ValueError):
        G.SamplingConfig(top_p=0.0)


def test_sampled_generation_is_seeded():
    model, params = golden_model("gqa2_untied")
    batch = R.jax_generation_batch(R.generation_prompts())
    gen = G.Generator(model, params)
    s = sampling([255], temperature=1.5)
    a, b, c = gen(batch, s, rng=1), gen(batch, s, rng=1), gen(batch, s, rng=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_compile_per_shape():
    model, params = golden_model("gqa2_untied")
    gen = G.Generator(model, params)
    batch = R.jax_generation_batch(R.generation_prompts())
    other = R.jax_generation_batch(R.generation_prompts(seed=7))
    s = sampling([255])
    gen(batch, s)
    gen(other, s)
    assert gen._fn(s)._cache_size() == 1
    assert gen.compiled == 1


def test_sharded_generation_equals_single_device():
    model, params = golden_model("mha_head32")
    batch = R.jax_generation_batch(R.generation_prompts())
    single = G.Generator(model, params)(batch, sampling([255]))
    mesh = sharding.make_mesh((2, 2, 2))
    _, placed = load_hf_checkpoint(f"{R.GOLDEN}/mha_head32", mesh=mesh)  # params on their shards
    sharded = G.Generator(model, placed, mesh=mesh)(batch, sampling([255]))
    np.testing.assert_array_equal(sharded, single)
