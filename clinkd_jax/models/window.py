"""Qwen2.5-VL's window attention in the vision tower, with static shapes and no (N, N) mask.

transformers tiles each image's merged-token grid into windows of `window_size / patch_size / merge` merged
tokens a side (4 for 112 px windows), reorders the patches window by window, runs most blocks over each window
alone (variable-length attention) and a few (`fullatt_block_indexes`) over the whole image, and undoes the
reordering after the merger. Attention does not care about order, only about who sees whom, so here:

  * `window_order` sorts each sample's merge units by (image, window row, window column) — computed in the
    model from the patches' (row, col) ids, so the data pipeline and its batches are the same for every family —
    giving the permutation and each patch's window id; padding sorts last;
  * `window_attention` then attends in blocks of W = (window side in patches)^2 query rows against the keys of
    the block and its two neighbours (a window of at most W contiguous patches never reaches further), masked to
    the same window: O(N * 3W) work and memory instead of O(N^2);
  * the tower gathers its input into that order and its output back (`unsort`), so everything outside
    (merger, scatter into the LLM, the vision outputs tests compare) sees the usual order.

Images only: every patch of an image is one frame (grid t = 1), as the image processor emits images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clinkd_jax.models import attention as attn_lib

_BIG = 1 << 30  # sort key of padding units: after every real one


def window_order(position_ids_bn2: jax.Array, segment_ids_bn: jax.Array, merge_tokens: int, window_patches: int):
    """(perm (B, N): the patch order that makes every window contiguous, window ids (B, N) in that order:
    0 for padding, else distinct per (image, window)). Whole merge units move, their patches in order."""
    b, n = segment_ids_bn.shape
    units = n // merge_tokens
    first = position_ids_bn2.reshape(b, units, merge_tokens, 2)[:, :, 0]  # (B, U, 2) a unit's first patch
    seg = segment_ids_bn.reshape(b, units, merge_tokens)[:, :, 0]
    wrow, wcol = first[..., 0] // window_patches, first[..., 1] // window_patches
    window = (seg * 4096 + wrow) * 4096 + wcol + 1  # one id per (image, window row, window col); ids < 2^31
    window = jnp.where(seg > 0, window, 0)
    key = jnp.where(seg > 0, window, _BIG)
    unit_perm = jnp.argsort(key, axis=1, stable=True)  # (B, U): windows contiguous, units in reading order inside
    perm = (unit_perm[..., None] * merge_tokens + jnp.arange(merge_tokens)).reshape(b, n)
    sorted_window = jnp.take_along_axis(window, unit_perm, axis=1)
    return perm, jnp.repeat(sorted_window, merge_tokens, axis=1)


def gather(x_bn: jax.Array, perm_bn: jax.Array) -> jax.Array:
    """x[b, perm[b, i]] along axis 1 (any trailing axes)."""
    idx = perm_bn.reshape(perm_bn.shape + (1,) * (x_bn.ndim - 2))
    return jnp.take_along_axis(x_bn, idx, axis=1)


def unsort(x_bn: jax.Array, perm_bn: jax.Array) -> jax.Array:
    """The inverse of `gather(., perm)`."""
    return gather(x_bn, jnp.argsort(perm_bn, axis=1))


def window_attention(q, k, v, window_ids_bn: jax.Array, block: int) -> jax.Array:
    """q, k, v (B, N, H, D) in window order; each query attends to the keys of its own window only.

    Queries in blocks of `block` rows (>= the largest window) against the keys of the blocks before, at and
    after it: a contiguous window of at most `block` patches lies within those three."""
    b, n, h, d = q.shape
    pad = -n % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        window_ids_bn = jnp.pad(window_ids_bn, ((0, 0), (0, pad)))
    nb = (n + pad) // block

    def neighbours(x):  # (B, nb*block, ...) -> (B, nb, 3*block, ...): blocks i-1, i, i+1 (zeros past the ends)
        x = x.reshape((b, nb, block) + x.shape[2:])
        x = jnp.pad(x, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2))
        return jnp.concatenate([x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=2)

    qb = q.reshape(b * nb, block, h, d)
    kb, vb = (neighbours(x).reshape(b * nb, 3 * block, h, d) for x in (k, v))
    q_ids = window_ids_bn.reshape(b * nb, block)
    k_ids = neighbours(window_ids_bn).reshape(b * nb, 3 * block)
    mask = ((q_ids[:, :, None] == k_ids[:, None, :]) & (k_ids[:, None, :] > 0))[:, None]  # (B*nb, 1, W, 3W)
    out = attn_lib.dot_product_attention(qb, kb, vb, mask, impl="xla")
    return out.reshape(b, nb * block, h, d)[:, :n]
