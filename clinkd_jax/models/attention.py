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

Two CPU levers of impl "xla" (calls of more than one query row), same arithmetic in another order:
  * `per_head` — one (sample, KV head) pair at a time in a loop: each step's matmuls are 2-D and its (T, S)
    scores stay in cache (XLA:CPU ran the batched (B, K) matmuls at about a quarter of its 2-D rate), with
    a flash-style backward that keeps no (T, S) tensor.
  * `query_block` — the queries in blocks of that many rows: a (block, S) score tensor at a time, which bounds
    the memory of large images (the vision tower uses it).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

IMPLS = ("xla", "jax", "cudnn", "splash")
log = logging.getLogger("clinkd_jax.models")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_b1ts: jax.Array,
    *,
    impl: str = "xla",
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    per_head: bool = False,
    query_block: int = 0,
    kv_heads_first: bool = False,
) -> jax.Array:
    """Scaled dot-product attention; K/V may have fewer heads than Q (grouped-query attention).

    q (B, T, N, H); k, v (B, S, K, H) with N % K == 0, or (B, K, S, H) with `kv_heads_first` (the KV cache's
    layout, which the "xla" matmuls take as it is); returns (B, T, N, H) in q's dtype.
    `q_segment_ids`/`kv_segment_ids`/`causal` describe the same mask for kernels that take
    segment ids instead of a dense mask (splash).
    """
    swap = lambda x: x.transpose(0, 2, 1, 3)  # (B, S, K, H) <-> (B, K, S, H)
    k_first, v_first = (k, v) if kv_heads_first else (swap(k), swap(v))  # the "xla" paths' layout
    t = q.shape[1]
    # a decode step over the cache takes the "xla" path with every impl: one query row is memory-bound, and the
    # cache is laid out for these matmuls (the kernels would need it transposed, a copy per layer and token)
    if impl == "xla" or (kv_heads_first and t == 1):
        if impl != "xla":
            _say_once(f"attention {impl!r}: a decode step over a {k_first.shape[2]}-slot KV cache uses attention 'xla'")
        if t == 1 or mask_b1ts.shape[-2] != t:  # a decode step, a broadcast mask: one pass
            return _xla_attention(q, k_first, v_first, mask_b1ts)
        if per_head:
            return _xla_attention_per_head(q, k_first, v_first, mask_b1ts, query_block)
        return _in_query_blocks(_xla_attention, q, k_first, v_first, mask_b1ts, query_block)
    k, v = (swap(k), swap(v)) if kv_heads_first else (k, v)  # the kernels' layout: (B, S, K, H)
    if impl in ("jax", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask_b1ts, implementation=None if impl == "jax" else "cudnn")
    if impl == "splash":
        from clinkd_jax.models import splash  # imported lazily: Pallas TPU kernels

        if q_segment_ids is not None and splash.supported(q.shape[1], k.shape[1]):
            return splash.attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal)
        _say_once(f"attention 'splash': {t} query row(s) over {k.shape[1]} keys (a decode step or a read of a KV "
                  "cache, not self-attention) use attention 'xla'")
        return _xla_attention(q, k_first, v_first, mask_b1ts)
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")


_said: set[str] = set()


def _say_once(message: str) -> None:
    """Log a kernel fallback once per process and shape (it is decided while tracing, once per compile)."""
    if message not in _said:
        _said.add(message)
        log.info(message)


def _xla_attention(q, k, v, mask):
    """Written for XLA's dot layouts: the (B, K) batch dimensions lead every operand (the small q/k/v and
    output are transposed, never the (T, S) scores), and the mask is an additive bias, whose gradient needs
    no mask (nothing per layer is kept for the backward pass but the probabilities). The 1/sqrt(H) scale
    goes on q, a (T, H) pass instead of one over the (T, S) scores (on XLA:CPU the latter is a separate
    copy of the scores)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[1]  # k, v (B, K, S, H)
    g = n // kv_heads
    q = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # (B,K,G,T,H)
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, :, None]  # (B, 1, 1, T, S); min + score == min
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _in_query_blocks(attend, q, k, v, mask, block: int):
    """`attend` over blocks of `block` query rows (q's axis 1, the mask's axis -2), concatenated; 0 = at once."""
    t = q.shape[1]
    if not 0 < block < t:
        return attend(q, k, v, mask)
    return jnp.concatenate([attend(q[:, i:i + block], k, v, mask[..., i:i + block, :]) for i in range(0, t, block)],
                           axis=1)


def _xla_attention_per_head(q, k, v, mask, query_block: int):
    """`_xla_attention` one (sample, KV head) pair per step of a `lax.map`: (G*T, H) x (H, S) matmuls without
    batch dimensions, and (G, T, S) scores that fit in cache: XLA:CPU's batched matmuls over all pairs run at a
    fraction of its plain matmuls' rate (bench/history.md)."""
    b, t, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]  # k, v (B, K, S, H)
    g = n // kv_heads
    q = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b * kv_heads, g, t, h)
    k, v = (x.reshape(b * kv_heads, s, h) for x in (k, v))
    mask = jnp.broadcast_to(mask, (b, 1, t, s))

    def pair(xs):
        i, q_gth, k_sh, v_sh = xs
        return _in_query_blocks(_attend_2d, q_gth, k_sh, v_sh, mask[i // kv_heads, 0], query_block)

    out = jax.lax.map(pair, (jnp.arange(b * kv_heads), q, k, v))  # (B*K, G, T, H)
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _scores_2d(q_gth, k_sh, mask_ts):
    scores = jnp.einsum("gth,sh->gts", q_gth, k_sh).astype(jnp.float32)
    return scores + jnp.where(mask_ts, 0.0, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attend_2d(q_gth, k_sh, v_sh, mask_ts):
    """One pair's attention, q already scaled. Its backward is written out (below), flash-attention style:
    only the output and each row's max and sum are kept, and the probabilities are recomputed from q and k
    (one more (T, H) x (H, S) matmul) instead of being stacked per pair (a (T, S) float32 buffer to fill,
    write and read back per pair and layer); and every matmul takes the (T, S) operand in its stored
    layout (differentiated automatically, XLA:CPU copied a transpose of it per pair)."""
    return _attend_2d_fwd(q_gth, k_sh, v_sh, mask_ts)[0]


def _attend_2d_fwd(q_gth, k_sh, v_sh, mask_ts):
    scores = _scores_2d(q_gth, k_sh, mask_ts)
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - top)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    # normalised after the matmul: a (T, H) division instead of a (T, S) one written out for it
    out = (jnp.einsum("gts,sh->gth", unnormalised.astype(v_sh.dtype), v_sh) / total).astype(v_sh.dtype)
    # the max and the sum, not their log-sum-exp: a fully masked row (scores ~ float32 min) would lose log(S)
    return out, (q_gth, k_sh, v_sh, mask_ts, out, top, total)


def _attend_2d_bwd(res, d_out):
    q, k, v, mask, out, top, total = res
    probs = jnp.exp(_scores_2d(q, k, mask) - top) / total  # the forward's, from its max and sum
    d_probs = jnp.einsum("gth,sh->gts", d_out, v).astype(jnp.float32)
    # softmax backward: P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O), a (T, H) product
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("gts,sh->gth", d_scores, k)
    d_k = jnp.einsum("gth,gts->hs", q, d_scores).T  # XLA folds the .T into the matmul: no (T, S) transpose
    d_v = jnp.einsum("gth,gts->hs", d_out, probs.astype(d_out.dtype)).T
    return d_q, d_k, d_v, None


_attend_2d.defvjp(_attend_2d_fwd, _attend_2d_bwd)


def segment_mask(q_segments_bt: jax.Array, kv_segments_bs: jax.Array) -> jax.Array:
    """(B, 1, T, S): True where query and key share a segment id (vision: one image each)."""
    return (q_segments_bt[:, :, None] == kv_segments_bs[:, None, :])[:, None]


def causal_mask(q_slots_bt: jax.Array, kv_valid_bs: jax.Array) -> jax.Array:
    """(B, 1, T, S): key slot s is visible from query slot t when s <= t and s holds a real token."""
    s = jnp.arange(kv_valid_bs.shape[1])
    return ((s[None, None, :] <= q_slots_bt[:, :, None]) & kv_valid_bs[:, None, :])[:, None]
