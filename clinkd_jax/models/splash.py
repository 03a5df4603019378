"""Pallas splash attention (TPU) behind `attention_impl="splash"`.

Masks are expressed as segment ids plus an optional causal mask, never as a dense (T, S) array:
vision attention uses image segment ids, the LLM uses the attention mask as segment ids (padding = 0).
Grouped-query heads run as one multi-query kernel per KV head. Under a mesh the kernel runs inside
`shard_map` over the batch axes and, when the KV heads divide the tensor axis, over heads too.

Lengths must be multiples of the 128 block: the static text and patch buckets give that for training
and prefill. Calls that do not fit (single-token decode steps, a KV cache
longer than the query) are routed to the XLA path by `clinkd_jax.models.attention`.
On CPU the kernel runs in Pallas interpret mode (tests only; slow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from clinkd_jax import sharding

BLOCK = 128


def supported(q_len: int, kv_len: int) -> bool:
    """Splash needs equal query/key lengths that are multiples of the 128 block (no offset into a cache)."""
    return q_len == kv_len and q_len % BLOCK == 0


def _kernel(length: int, group: int, causal: bool, interpret: bool):
    base = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    b = BLOCK
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )
    # built per trace (not cached): its mask metadata arrays become constants of the trace that uses them
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([base] * group), block_sizes=sizes, interpret=interpret)


def _local(q, k, v, q_seg, kv_seg, *, causal: bool):
    """Per-shard body: q (B, T, N, H), k/v (B, S, K, H), segment ids (B, T) / (B, S)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    group = n // kv_heads
    kernel = _kernel(t, group, causal, jax.devices()[0].platform != "tpu")
    q = (q * (h**-0.5)).reshape(b, t, kv_heads, group, h).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    per_head = jax.vmap(lambda qh, kh, vh, seg: kernel(qh, kh, vh, segment_ids=seg), in_axes=(0, 0, 0, None))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0))
    out = per_batch(q, k, v, sk.SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32)))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v.dtype)


def attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool):
    """Splash attention; returns (B, T, N, H) like `dot_product_attention`."""
    body = functools.partial(_local, causal=causal)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return body(q, k, v, q_segment_ids, kv_segment_ids)
    shape = dict(mesh.shape)
    rules = sharding.current_rules()
    batch = sharding.logical_to_spec(("batch",), q.shape[:1], shape, rules)[0]
    heads = sharding.logical_to_spec((None, "act_kv_heads"), (1, k.shape[2]), shape, rules)[1]
    qspec, kspec, sspec = P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(qspec, kspec, kspec, sspec, sspec), out_specs=qspec, check_vma=False
    )(q, k, v, q_segment_ids, kv_segment_ids)
