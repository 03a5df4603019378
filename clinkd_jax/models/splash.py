"""Pallas splash attention (TPU) behind `attention_impl="splash"`.

Masks are expressed as segment ids plus an optional causal mask, never as a dense (T, S) array:
vision attention uses image segment ids, the LLM uses the attention mask as segment ids (padding = 0).
Grouped-query heads run as one multi-query kernel per KV head. Under a mesh the kernel runs inside
`shard_map` over the batch axes and, when the KV heads divide the tensor axis, over heads too.

Self-attention only (queries and keys of one length: training, and a prefill into a fresh KV cache). A length
that is not a multiple of the 128 block is padded up to one with segment id 0 (what padding already has: real
tokens never see it) and the output cut back, so every bucket takes the kernel. Calls that do not fit
(single-token decode steps, reads of a KV cache longer than the query) are routed to the XLA path by
`clinkd_jax.models.attention`, which logs it once per shape.
Compiled for a TPU (a real one, or a slice described on a CPU host by `clinkd_jax.aot`) the kernel lowers through
Mosaic; elsewhere it runs in Pallas interpret mode (CPU tests only; slow).
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
    """Splash takes self-attention: equal query/key lengths (no offset into a cache); any length (padded)."""
    return q_len == kv_len


def _kernel(length: int, group: int, causal: bool, interpret: bool):
    base = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    b = BLOCK
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )
    # built per trace (not cached): its mask metadata arrays become constants of the trace that uses them
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([base] * group), block_sizes=sizes, interpret=interpret)


def _platform() -> str:
    """The platform the program is compiled for: the active mesh's devices (a TPU slice described on a CPU host,
    `clinkd_jax.aot`), else the default backend. Interpret mode only where it is not a TPU."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _local(q, k, v, q_seg, kv_seg, *, causal: bool):
    """Per-shard body: q (B, T, N, H), k/v (B, S, K, H), segment ids (B, T) / (B, S)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    group = n // kv_heads
    kernel = _kernel(t, group, causal, interpret=_platform() != "tpu")
    q = (q * (h**-0.5)).reshape(b, t, kv_heads, group, h).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    per_head = jax.vmap(lambda qh, kh, vh, seg: kernel(qh, kh, vh, segment_ids=seg), in_axes=(0, 0, 0, None))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0))
    out = per_batch(q, k, v, sk.SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32)))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v.dtype)


def attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool):
    """Splash attention; returns (B, T, N, H) like `dot_product_attention`."""
    t = q.shape[1]
    pad = -t % BLOCK
    if pad:  # padded slots get segment 0 (padding): no real query sees them; their outputs are cut off
        seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, q_segment_ids, kv_segment_ids = map(seq, (q, k, v, q_segment_ids, kv_segment_ids))
    return _sharded(q, k, v, q_segment_ids, kv_segment_ids, causal)[:, :t]


def _sharded(q, k, v, q_segment_ids, kv_segment_ids, causal):
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
