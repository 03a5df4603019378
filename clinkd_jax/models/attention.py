"""The one attention function every module calls, so the kernel is a config switch.

`impl`:
  * "xla"    — plain einsums with a float32 softmax, grouped-query heads without repeating K/V.
               Runs everywhere (CPU included) and matches transformers' eager attention.
  * "jax"    — `jax.nn.dot_product_attention` with its default backend choice.
  * "cudnn"  — `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention on
               NVIDIA GPUs (bf16/fp16 inputs).
  * "splash" — Pallas splash attention on TPU (see `clinkd_jax.models.splash`), driven by segment ids;
               shapes it cannot take (single-token decode, reads of a longer KV cache) use "xla".

Masks are boolean, True = may attend, broadcastable to (B, 1, T, S).

`query_block` (impl "xla", non-causal calls: the vision tower) computes the queries in blocks of that many
rows: the same arithmetic on a smaller (block, S) score tensor, which stays in cache (bench/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "jax", "cudnn", "splash")


def dot_product_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_b1ts: jax.Array,
    *,
    impl: str = "xla",
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    query_block: int = 0,
) -> jax.Array:
    """Scaled dot-product attention; K/V may have fewer heads than Q (grouped-query attention).

    q (B, T, N, H); k, v (B, S, K, H) with N % K == 0; returns (B, T, N, H) in q's dtype.
    `q_segment_ids`/`kv_segment_ids`/`causal` describe the same mask for kernels that take
    segment ids instead of a dense mask (splash).
    """
    if impl == "xla":
        t = q_btnh.shape[1]
        if causal or not 0 < query_block < t or mask_b1ts.shape[-2] != t:
            return _xla_attention(q_btnh, k_bskh, v_bskh, mask_b1ts)
        blocks = range(0, t, query_block)
        return jnp.concatenate([_xla_attention(q_btnh[:, i:i + query_block], k_bskh, v_bskh,
                                               mask_b1ts[..., i:i + query_block, :]) for i in blocks], axis=1)
    if impl in ("jax", "cudnn"):
        return jax.nn.dot_product_attention(
            q_btnh, k_bskh, v_bskh, mask=mask_b1ts, implementation=None if impl == "jax" else "cudnn"
        )
    if impl == "splash":
        from clinkd_jax.models import splash  # imported lazily: Pallas TPU kernels

        if q_segment_ids is not None and splash.supported(q_btnh.shape[1], k_bskh.shape[1]):
            return splash.attention(q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids, causal=causal)
        return _xla_attention(q_btnh, k_bskh, v_bskh, mask_b1ts)  # decode steps, cache reads
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")


def _xla_attention(q, k, v, mask):
    """Written for XLA's dot layouts: the (B, K) batch dimensions lead every operand (the small q/k/v and
    output are transposed, never the (T, S) scores), and the mask is an additive bias, whose gradient needs
    no mask (nothing per layer is kept for the backward pass but the probabilities). The 1/sqrt(H) scale
    goes on q, a (T, H) pass instead of one over the (T, S) scores (on XLA:CPU the latter was a separate
    copy of the scores: 3 % of the time to first token, bench/README.md)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    q = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # (B,K,G,T,H)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, :, None]  # (B, 1, 1, T, S); min + score == min
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def segment_mask(q_segments_bt: jax.Array, kv_segments_bs: jax.Array) -> jax.Array:
    """(B, 1, T, S): True where query and key share a segment id (vision: one image each)."""
    return (q_segments_bt[:, :, None] == kv_segments_bs[:, None, :])[:, None]


def causal_mask(q_slots_bt: jax.Array, kv_valid_bs: jax.Array) -> jax.Array:
    """(B, 1, T, S): key slot s is visible from query slot t when s <= t and s holds a real token."""
    s = jnp.arange(kv_valid_bs.shape[1])
    return ((s[None, None, :] <= q_slots_bt[:, :, None]) & kv_valid_bs[:, None, :])[:, None]
