"""The Qwen2-VL-family vision tower: patch embedding, 2-D rotary, pre-norm ViT blocks, then the merger.

Qwen2-VL: LayerNorm and an fc1 -> act -> fc2 MLP, every block over the whole image. Qwen2.5-VL: RMSNorm, a
gated SiLU MLP, and window attention in all blocks but `fullatt_block_indexes` (`clinkd_jax.models.window`).
Qwen3-VL: Qwen2-VL's blocks on 16 px patches, plus a learned position table resampled to each image's grid
(`position_embedding`) and DeepStack: the outputs of `deepstack_visual_indexes` blocks, each merged by its own
merger, go to the LLM's first layers.

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
from clinkd_jax.models import rope, window
from clinkd_jax.models.config import VisionConfig
from clinkd_jax.models.layers import INIT_STD, activation, dense, gated_activation, maybe_remat, named
from clinkd_jax.models.projector import PatchMerger, vision_norm
from clinkd_jax.sharding import constrain

Dtype = Any


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, p, p) on a flattened patch is a linear map (with a bias in Qwen3-VL)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches_bnp: jax.Array) -> jax.Array:
        proj = dense(
            self.cfg.embed_dim, ("vit_patch", "vit_embed"), use_bias=self.cfg.patch_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
        )
        return proj(patches_bnp.astype(self.dtype))


def position_taps(pos_bn2, seg_bn, side: int):
    """Bilinear resampling (corners aligned) of a (side x side) table to each image's own patch grid: for every
    patch, the 4 table rows to read and their weights, (B, N, 4) each. An image's grid size is its largest
    row / column id + 1 over its patches (`vision_segment_ids`), so the pipeline passes nothing new."""

    def grid_of(pos_n2, seg_n):
        n = seg_n.shape[0]
        size = jax.ops.segment_max(pos_n2, seg_n, num_segments=n + 1) + 1  # (images + padding, 2)
        return size[seg_n]

    size = jax.vmap(grid_of)(pos_bn2, seg_bn).astype(jnp.float32)  # (B, N, 2): (height, width) in patches
    src = pos_bn2.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1)
    lo = jnp.floor(src)
    frac = src - lo
    lo = lo.astype(jnp.int32)
    rows, weights = [], []
    for dh in (0, 1):
        for dw in (0, 1):
            r = jnp.clip(lo[..., 0] + dh, 0, side - 1)
            c = jnp.clip(lo[..., 1] + dw, 0, side - 1)
            wh = frac[..., 0] if dh else 1 - frac[..., 0]
            ww = frac[..., 1] if dw else 1 - frac[..., 1]
            rows.append(r * side + c)
            weights.append(wh * ww)
    return jnp.stack(rows, -1), jnp.stack(weights, -1)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    per_head: bool = False
    query_block: int = 0

    @nn.compact
    def __call__(self, x_bne, cos_bnh, sin_bnh, mask_b1nn, segment_ids_bn, window_ids_bn=None, full=None):
        """`window_ids_bn` (window order, `models.window`): attend within windows, unless the scanned flag
        `full` says this block attends over the whole image."""
        b, n, _ = x_bne.shape
        heads, hd = self.cfg.num_heads, self.cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * self.cfg.embed_dim, ("vit_embed", "vit_qkv"), name="qkv", **kw)(x_bne)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, heads, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        q = rope.apply_rotary(q, cos_bnh, sin_bnh)
        k = rope.apply_rotary(k, cos_bnh, sin_bnh)

        def whole_image(q, k, v):
            return attn_lib.dot_product_attention(
                q, k, v, mask_b1nn, impl=self.attention_impl,
                q_segment_ids=segment_ids_bn, kv_segment_ids=segment_ids_bn, per_head=self.per_head,
                query_block=self.query_block,
            )

        if window_ids_bn is None:
            out = whole_image(q, k, v)
        else:
            def windowed(q, k, v):
                return window.window_attention(q, k, v, window_ids_bn, self.cfg.window_patches**2)

            out = jax.lax.cond(full, whole_image, windowed, q, k, v)
        out = constrain(out.reshape(b, n, heads * hd), ("batch", "patches", "act_heads"))
        return dense(self.cfg.embed_dim, ("vit_qkv", "vit_embed"), name="proj", **kw)(out)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bne):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.cfg.mlp == "gated":  # Qwen2.5-VL: down(act(gate(x)) * up(x)), every projection with a bias
            gate = dense(self.cfg.mlp_dim, ("vit_embed", "vit_mlp"), name="gate_proj", **kw)(x_bne)
            up = dense(self.cfg.mlp_dim, ("vit_embed", "vit_mlp"), name="up_proj", **kw)(x_bne)
            h = constrain(gated_activation(self.cfg.hidden_act)(gate, up), ("batch", "patches", "act_mlp"))
            return dense(self.cfg.embed_dim, ("vit_mlp", "vit_embed"), name="down_proj", **kw)(h)
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
    def __call__(self, carry, cos_bnh, sin_bnh, mask_b1nn, segment_ids_bn, window_ids_bn=None, full=None,
                 slot=None):
        """`carry` is x (B, N, E), or with DeepStack (x, stack (K, B, N, E)): block outputs the LLM takes are
        written into their slot (`slot` >= 0) in the loop, so K outputs are held rather than one per block."""
        x_bne, stack = carry if slot is not None else (carry, None)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = vision_norm(self.cfg, "norm1", **kw)(x_bne)
        attn = VisionAttention(self.cfg, attention_impl=self.attention_impl, per_head=self.per_head,
                               query_block=self.query_block, name="attn", **kw)
        x_bne = x_bne + attn(h, cos_bnh, sin_bnh, mask_b1nn, segment_ids_bn, window_ids_bn, full)
        h = vision_norm(self.cfg, "norm2", **kw)(x_bne)
        x_bne = constrain(x_bne + VisionMLP(self.cfg, name="mlp", **kw)(h), ("batch", "patches", "act_embed"))
        if slot is None:
            return x_bne, None
        k = jnp.maximum(slot, 0)
        kept = jax.lax.dynamic_index_in_dim(stack, k, keepdims=False)
        stack = jax.lax.dynamic_update_index_in_dim(stack, jnp.where(slot >= 0, x_bne, kept), k, 0)
        stack = constrain(stack, (None, "batch", "patches", "act_embed"))
        return (x_bne, stack), None


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
            split_rngs={"params": True, "dropout": True},  # LoRA dropout: its own draws per layer
            # then per block: whether it attends over the whole image, and its DeepStack slot (-1: none)
            in_axes=(nn.broadcast,) * 5 + (0, 0),
            length=self.cfg.depth,
            unroll=min(self.scan_unroll, self.cfg.depth),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg, attention_impl=self.attention_impl, per_head=self.per_head, query_block=self.query_block,
          **kw)
        self.merger = PatchMerger(self.cfg, self.out_dim, **kw)
        if self.cfg.num_position_embeddings:
            self.pos_embed = nn.Embed(self.cfg.num_position_embeddings, self.cfg.embed_dim, embedding_init=named(
                nn.initializers.normal(INIT_STD), ("vit_pos", "vit_embed")), **kw)
        self.deepstack_mergers = [PatchMerger(self.cfg, self.out_dim, postshuffle_norm=True, **kw)
                                  for _ in self.cfg.deepstack_visual_indexes]

    def encode(self, pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn):
        """(B, N, patch_dim), (B, N, 2) row/col ids, (B, N) image ids -> ViT output (B, N, embed_dim)."""
        return self._encode(pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn)[0]

    def _encode(self, pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn):
        """ViT output and the DeepStack blocks' outputs [(B, N, embed_dim)], all in patch order."""
        c = self.cfg
        pos, seg, pixels = vision_position_ids_bn2, vision_segment_ids_bn, pixel_values_bnp
        perm = window_ids = full = None
        if c.window_size:  # blocks run in window order (`models.window`); the output is put back
            perm, window_ids = window.window_order(pos, seg, c.merge_tokens, c.window_patches)
            pos, seg, pixels = (window.gather(x, perm) for x in (pos, seg, pixels))
            full = jnp.isin(jnp.arange(c.depth), jnp.asarray(c.fullatt_block_indexes, jnp.int32))
        x = self.patch_embed(pixels)
        if c.num_position_embeddings:  # Qwen3-VL: the learned table, resampled to each image's grid
            rows, weights = position_taps(pos, seg, c.position_side)
            x = x + jnp.einsum("bnk,bnke->bne", weights.astype(self.dtype), self.pos_embed(rows))
        x = constrain(x, ("batch", "patches", "act_embed"))
        cos, sin = rope.vision_cos_sin(pos, c.head_dim, c.rope_theta)
        mask = attn_lib.segment_mask(seg, seg)
        if c.deepstack_visual_indexes:  # merger k takes the k-th listed block
            ks = c.deepstack_visual_indexes
            slots = jnp.asarray([ks.index(i) if i in ks else -1 for i in range(c.depth)], jnp.int32)
            (x, buf), _ = self.blocks((x, jnp.zeros((len(ks),) + x.shape, x.dtype)), cos, sin, mask, seg,
                                      window_ids, full, slots)
            stack = list(buf)
        else:
            x, _ = self.blocks(x, cos, sin, mask, seg, window_ids, full, None)
            stack = []
        if perm is not None:
            x, stack = window.unsort(x, perm), [window.unsort(s, perm) for s in stack]
        return x, stack

    def deepstack(self, stack):
        """The DeepStack features (K, B, N / merge**2, out_dim) in block order (LLM layer k gets the k-th
        earliest block's), each block's through the merger of its place in `deepstack_visual_indexes`."""
        order = sorted(range(len(stack)), key=lambda k: self.cfg.deepstack_visual_indexes[k])
        return jnp.stack([self.deepstack_mergers[k](stack[k]) for k in order])

    def __call__(self, pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn):
        """Merged vision tokens (B, N / merge**2, out_dim), in the order of the <|image_pad|> tokens, and the
        DeepStack features (K, B, N / merge**2, out_dim), or None without DeepStack."""
        x, stack = self._encode(pixel_values_bnp, vision_position_ids_bn2, vision_segment_ids_bn)
        return self.merger(x), (self.deepstack(stack) if stack else None)


__all__ = ["PatchEmbed", "VisionAttention", "VisionMLP", "VisionBlock", "VisionTransformer"]
