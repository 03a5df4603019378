"""The Qwen2 / Qwen3 decoder: RMSNorm, grouped-query attention (Qwen2: q/k/v biases; Qwen3: no biases, RMSNorm
over each head's q and k), SwiGLU MLP, M-RoPE, KV cache, and Qwen3-VL's DeepStack inputs.

Layers are scanned (params stacked on a leading "layers" axis), which keeps compile time flat in depth.

KV cache: one static-size buffer for all layers (layers, B, S, kv_heads, head_dim), carried through the layer
scan and written in place at a shared slot index; or, for unrolled decode steps (`KVCache.per_layer`), one
(B, kv_heads, S, head_dim) buffer per layer, which the attention's matmuls read as written. Prompts of
different lengths are left-padded, so every sample writes its next token at the same slot and `valid` marks
which slots hold real tokens. A decode step's position ids are `slot + decode_offset` per sample
(`clinkd_jax.data.positions`), which continues M-RoPE / MCG-RoPE positions correctly.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from clinkd_jax.models import attention as attn_lib
from clinkd_jax.models import rope
from clinkd_jax.models.config import TextConfig
from clinkd_jax.models.layers import INIT_STD, RMSNorm, dense, gated_activation, maybe_remat, named
from clinkd_jax.sharding import constrain

Dtype = Any


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer plus slot bookkeeping. A plain pytree: jit-, scan- and shard-friendly.

    k, v:   (layers, B, S, kv_heads, head_dim) in the compute dtype; or, for unrolled layers (`per_layer`),
            a tuple of one (B, kv_heads, S, head_dim) buffer per layer
    valid:  (B, S) bool, slot holds a real (non-padding) token
    index:  () int32, the next slot to write (shared by the batch)
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    fresh: bool = flax.struct.field(pytree_node=False, default=False)  # nothing written yet (static)

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32), fresh=True,
        )

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    def per_layer(self) -> "KVCache":
        """The same cache as one (B, kv_heads, S, head_dim) buffer per layer, for unrolled layers
        (Qwen2Model(stacked=False)): each updated in place and read by the attention's matmuls as it is, where
        a layer's slice of the stack was a transposed copy per layer and token on XLA:CPU. One copy per call."""
        split = lambda x: x if isinstance(x, tuple) else tuple(x[i].transpose(0, 2, 1, 3) for i in range(len(x)))
        return self.replace(k=split(self.k), v=split(self.v))

    logical_axes = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")


class Qwen2Attention(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    per_head: bool = False  # "xla" attention one (sample, KV head) pair at a time (models.attention)

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts, segment_ids_bt, cache, layer, cache_index):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = dict(use_bias=c.attention_bias, **kw)
        q = dense((c.num_attention_heads, c.head_dim), ("embed", "q_heads", "head_dim"), name="q_proj", **proj)(x_btd)
        k = dense((c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", **proj)(x_btd)
        v = dense((c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", **proj)(x_btd)
        if c.qk_norm:  # Qwen3: each head's q and k normalised over head_dim, before the rotary
            q = RMSNorm(c.rms_norm_eps, name="q_norm", **kw)(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm", **kw)(k)
        q = constrain(rope.apply_rotary(q, cos_bth, sin_bth), ("batch", "length", "act_heads", "head_dim"))
        k = constrain(rope.apply_rotary(k, cos_bth, sin_bth), ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        kv_heads_first = False
        # a prefill into a fresh cache (its mask spans this chunk's keys only) attends over the chunk, not the buffer
        read_buffer = cache is not None and mask_b1ts.shape[-1] != x_btd.shape[1]
        if cache is not None:  # write this chunk at [index, index + T) of this layer, attend over its buffer
            # The stacked (layers, ...) cache rides the layer scan's carry and is written in place: a decode
            # step moves one slot per layer, not the layer's whole buffer in and out of the scan.
            ck, cv = cache
            zero = jnp.zeros((), jnp.int32)
            k, v = k.astype(ck.dtype), v.astype(cv.dtype)
            if ck.ndim == 5:  # the stacked (layers, B, S, K, H) buffer: this layer's slab
                at = (layer, zero, cache_index, zero, zero)
                ck, cv = jax.lax.dynamic_update_slice(ck, k[None], at), jax.lax.dynamic_update_slice(cv, v[None], at)
                if read_buffer:
                    k, v = (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (ck, cv))
            else:  # this layer's own (B, K, S, H) buffer, read as written (no slice, no transpose to copy)
                at = (zero, zero, cache_index, zero)
                ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3), at)
                cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3), at)
                if read_buffer:
                    k, v, kv_heads_first = ck, cv, True
            cache = (ck, cv)
        out = attn_lib.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask_b1ts, impl=self.attention_impl,
            q_segment_ids=segment_ids_bt, kv_segment_ids=segment_ids_bt, causal=True, per_head=self.per_head,
            kv_heads_first=kv_heads_first,
        )
        out = checkpoint_name(out, "context")  # kept by model.remat="minimal_with_context"
        out = dense(c.hidden_size, ("q_heads", "head_dim", "embed"), axis=(-2, -1), use_bias=False, name="o_proj",
                    **kw)(out)
        return out, cache


class Qwen2MLP(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x_btd)
        up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x_btd)
        h = constrain(gated_activation(c.hidden_act)(gate, up), ("batch", "length", "act_mlp"))
        return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block; a scan body: carry (x, stacked KV cache or None), this layer's index -> new carry.

    `deepstack_kbtd` (Qwen3-VL): K vision features already placed at the image tokens (zeros elsewhere); layer
    k < K adds the k-th to its output, as transformers adds them after decoder layers 0 .. K-1."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    per_head: bool = False

    @nn.compact
    def __call__(self, carry, layer, cos_bth, sin_bth, mask_b1ts, segment_ids_bt, cache_index, deepstack_kbtd=None,
                 deepstack_index=None):
        x_btd, cache = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.cfg.rms_norm_eps
        h = RMSNorm(eps, name="input_layernorm", **kw)(x_btd)
        h, cache = Qwen2Attention(self.cfg, attention_impl=self.attention_impl, per_head=self.per_head,
                                  name="self_attn", **kw)(
            h, cos_bth, sin_bth, mask_b1ts, segment_ids_bt, cache, layer, cache_index
        )
        x_btd = x_btd + h
        h = RMSNorm(eps, name="post_attention_layernorm", **kw)(x_btd)
        x_btd = x_btd + Qwen2MLP(self.cfg, name="mlp", **kw)(h)
        if deepstack_kbtd is not None:  # scanned: `layer` is traced; unrolled: `deepstack_index` is the static k
            k = deepstack_kbtd.shape[0]
            if deepstack_index is not None:
                x_btd = x_btd + deepstack_kbtd[deepstack_index].astype(x_btd.dtype)
            else:
                extra = jax.lax.dynamic_index_in_dim(deepstack_kbtd, jnp.minimum(layer, k - 1), keepdims=False)
                x_btd = x_btd + jnp.where(layer < k, extra, 0).astype(x_btd.dtype)
        return (constrain(x_btd, ("batch", "length", "act_embed")), cache), None


class Qwen2Model(nn.Module):
    """`model.*`: token embedding, decoder layers (scanned, params stacked on "layers"), final norm.

    `stacked=False` runs the layers as a Python loop over their own param trees `layers_0` ... (`unstack_layers`
    converts): generation's decode steps on CPU, where the scan copied every layer's weights out of the stacked
    arrays at every token.
    """

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"
    scan_unroll: int = 1
    per_head: bool = False  # attention one (sample, KV head) pair at a time (models.attention)
    stacked: bool = True  # params stacked on "layers" and scanned; False: one param tree per layer, unrolled

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, embedding_init=named(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
            **kw
        )
        if not self.stacked:  # named layers_0, layers_1, ... (unstack_layers)
            self.layers = [Qwen2DecoderLayer(c, attention_impl=self.attention_impl, per_head=self.per_head, **kw)
                           for _ in range(c.num_hidden_layers)]
        else:
            self.layers = nn.scan(
            maybe_remat(Qwen2DecoderLayer, self.remat),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},  # LoRA dropout: its own draws per layer
                in_axes=(0,) + (nn.broadcast,) * 6,
                length=c.num_hidden_layers,
                unroll=min(self.scan_unroll, c.num_hidden_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, attention_impl=self.attention_impl, per_head=self.per_head, **kw)
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def __call__(self, x_btd, position_ids_3bt, attention_mask_bt, cache: KVCache | None = None, deepstack_kbtd=None):
        """Input embeddings (B, T, D) -> (final-normed hidden states (B, T, D), updated cache or None).
        `deepstack_kbtd`: Qwen3-VL's K vision features at the image tokens, added after layers 0 .. K-1."""
        c = self.cfg
        b, t, _ = x_btd.shape
        cos, sin = rope.mrope_cos_sin(position_ids_3bt, c.head_dim, c.rope_theta, c.mrope_section,
                                      c.mrope_interleaved)
        q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:  # attention_mask: 0 = padding, else the conversation's number in a packed row
            index = jnp.zeros((), jnp.int32)
            segment_ids = attention_mask_bt.astype(jnp.int32)  # also what segment-id kernels (splash) take
            layer_caches = None
            # no attention across a packed row's conversations; padding queries see as before (never read)
            same = attn_lib.segment_mask(segment_ids, segment_ids) | (segment_ids == 0)[:, None, :, None]
            mask = attn_lib.causal_mask(q_slots, segment_ids > 0) & same
        else:
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask_bt.astype(bool), (0, index))
            layer_caches = (cache.k, cache.v)
            # a prefill into a fresh cache is self-attention over the prompt (segment-id kernels such as splash take
            # it); later chunks sit at an offset into the cache: dense mask only
            segment_ids = attention_mask_bt.astype(jnp.int32) if cache.fresh else None
            # a fresh cache holds nothing before this chunk (index 0): its keys are all there is to attend, so
            # the mask (and the attention) spans T keys, not the buffer's S (prefill of a prompt for n new tokens)
            mask = (attn_lib.causal_mask(q_slots, attention_mask_bt.astype(bool)) if cache.fresh
                    else attn_lib.causal_mask(index + q_slots, valid))
        if layer_caches is not None and isinstance(layer_caches[0], tuple) == self.stacked:
            raise ValueError("stacked layers take the stacked KVCache, unrolled ones (stacked=False) one buffer per "
                             "layer (cache.per_layer())")
        carry = (x_btd, layer_caches)
        if self.stacked:
            carry, _ = self.layers(carry, jnp.arange(c.num_hidden_layers, dtype=jnp.int32), cos, sin, mask,
                                   segment_ids, index, deepstack_kbtd)
        else:
            new = []
            for i, layer in enumerate(self.layers):  # each layer with its own cache buffers
                own = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
                ds = deepstack_kbtd if deepstack_kbtd is not None and i < deepstack_kbtd.shape[0] else None
                (x_btd, own), _ = layer((x_btd, own), None, cos, sin, mask, segment_ids, index, ds, i)
                new.append(own)
            carry = (x_btd, None if layer_caches is None else tuple(zip(*new)))
        x_btd, new_layer_caches = carry
        x_btd = self.norm(x_btd)
        new_cache = None
        if cache is not None:
            k, v = new_layer_caches
            new_cache = KVCache(k=k, v=v, valid=valid, index=index + t)
        return x_btd, new_cache


def unstack_layers(model_params: dict) -> dict:
    """Qwen2Model params: the scanned `layers` (stacked on axis 0) -> `layers_0`, `layers_1`, ... (stacked=False)."""
    params = dict(model_params)
    stacked = params.pop("layers")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    params.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)})
    return params
