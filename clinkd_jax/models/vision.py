"""The Qwen2-VL vision tower: patch embedding, 2-D rotary, pre-LayerNorm ViT blocks, then the merger.

Static shapes: each sample carries a fixed-size buffer of N patches (B, N, 1176). Any number of images
of different sizes share it; `vision_segment_ids` (B, N) says which image each patch belongs to
(1, 2, ... ; 0 = padding) and attention never crosses images. Patches are in merge-window order (every
`spatial_merge_size**2` consecutive patches form one merged LLM token), as the image processor emits them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clinkd_jax.models import attention as attn_lib
from clinkd_jax.models import rope
from clinkd_jax.models.config import VisionConfig
from clinkd_jax.models.layers import activation, dense, layer_norm, maybe_remat
from clinkd_jax.models.projector import PatchMerger
from clinkd_jax.sharding import constrain

Dtype = Any


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 14, 14) on a flattened patch is a bias-free linear map."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches_bnp: jax.Array) -> jax.Array:
        proj = dense(
            self.cfg.embed_dim, ("vit_patch", "vit_embed"), use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
        )
        return proj(patches_bnp.astype(self.dtype))


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    per_head: bool = False
    query_block: int = 0

    @nn.compact
    def __call__(self, x_bne, cos_bnh, sin_bnh, mask_b1nn, segment_ids_bn):
        b, n, _ = x_bne.shape
        heads, hd = self.cfg.num_heads, self.cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * self.cfg.embed_dim, ("vit_embed", "vit_qkv"), name="qkv", **kw)(x_bne)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, heads, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        q = rope.apply_rotary(q, cos_bnh, sin_bnh)
        k = rope.apply_rotary(k, cos_bnh, sin_bnh)
        out = attn_lib.dot_product_attention(
            q, k, v, mask_b1nn, impl=self.attention_impl,
            q_segment_ids=segment_ids_bn, kv_segment_ids=segment_ids_bn, per_head=self.per_head,
            query_block=self.query_block,
        )
        out = constrain(out.reshape(b, n, heads * hd), ("batch", "patches", "act_heads"))
        return dense(self.cfg.embed_dim, ("vit_qkv", "vit_embed"), name="proj", **kw)(out)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bne):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.cfg.mlp_dim, ("vit_embed", "vit_mlp"), name="fc1", **kw)(x_bne)
        h = constrain(activation(self.cfg.hidden_act)(h), ("batch", "patches", "act_mlp"))
        return dense(self.cfg.embed_dim, ("vit_mlp", "vit_embed"), name="fc2", **kw)(h)


class VisionBlock(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)). Written as a scan body: (carry, broadcast inputs)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    per_head: bool = False
    query_block: int = 0

    @nn.compact
    def __call__(self, x_bne, cos_bnh, sin_bnh, mask_b1nn, segment_ids_bn):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.cfg.layer_norm_eps
        h = layer_norm(eps, name="norm1", **kw)(x_bne)
        attn = VisionAttention(self.cfg, attention_impl=self.attention_impl, per_head=self.per_head,
                               query_block=self.query_block, name="attn", **kw)
        x_bne = x_bne + attn(h, cos_bnh, sin_bnh, mask_b1nn, segment_ids_bn)
        h = layer_norm(eps, name="norm2", **kw)(x_bne)
        x_bne = x_bne + VisionMLP(self.cfg, name="mlp", **kw)(h)
        return constrain(x_bne, ("batch", "patches", "act_embed")), None


class VisionTransformer(nn.Module):
    """`visual.*`: patch embedding, `depth` blocks (scanned, params stacked on "layers") and the merger."""

    cfg: VisionConfig
    out_dim: int  # LLM hidden size, the merger's output
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"
    scan_unroll: int = 1
    per_head: bool = False  # attention one (sample, head) pair at a time (models.attention)
    query_block: int = 0  # attention query rows per block (models.attention); 0 = all at once

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = PatchEmbed(self.cfg, **kw)
        self.blocks = nn.scan(
            maybe_remat(VisionBlock, self.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 4,
            length=self.cfg.depth,
            unroll=min(self.scan_unroll, self.cfg.depth),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg, attention_impl=self.attention_impl, per_head=self.per_head, query_block=self.query_block, **kw)
        self.merger = PatchMerger(self.cfg, self.out_dim, **kw)

    def encode(self, pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn):
        """(B, N, patch_dim), (B, N, 2) row/col ids, (B, N) image ids -> ViT output (B, N, embed_dim)."""
        x = constrain(self.patch_embed(pixel_values_bnp), ("batch", "patches", "act_embed"))
        cos, sin = rope.vision_cos_sin(vision_position_ids_bn2, self.cfg.head_dim, self.cfg.rope_theta)
        mask = attn_lib.segment_mask(vision_segment_ids_bn, vision_segment_ids_bn)
        x, _ = self.blocks(x, cos, sin, mask, vision_segment_ids_bn)
        return x

    def __call__(self, pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn):
        """Merged vision tokens (B, N / merge**2, out_dim), in the order of the <|image_pad|> tokens."""
        return self.merger(self.encode(pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn))


__all__ = ["PatchEmbed", "VisionAttention", "VisionMLP", "VisionBlock", "VisionTransformer"]
