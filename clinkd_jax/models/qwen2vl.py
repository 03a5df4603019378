"""Qwen2-VL for conditional generation: vision tower -> patch merger -> scatter into <|image_pad|> -> Qwen2.
The same class runs Qwen2.5-VL and Qwen3-VL (the config's features; Qwen3-VL's DeepStack features are scattered
to the image tokens like the merged ones and added inside the LLM's first layers).

Parameter tree (mirrors the Hugging Face module names, see `clinkd_jax.hf_checkpoint`):
    visual/{patch_embed, blocks (stacked), merger}
    model/{embed_tokens, layers (stacked), norm}
    lm_head            (absent when the embeddings are tied)

Inputs (all static-shaped; positions are computed on the host, `clinkd_jax.data.positions`):
    input_ids            (B, L) int32
    attention_mask       (B, L) int/bool, 1 = real token
    position_ids         (3, B, L) int32, M-RoPE / MCG-RoPE ids
    pixel_values         (B, N, 1176) patches, merge-window order            [optional]
    vision_position_ids  (B, N, 2) int32, (row, col) of each patch            [with pixel_values]
    vision_segment_ids   (B, N) int32, image number of each patch, 0 = pad    [with pixel_values]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from clinkd_jax import sharding
from clinkd_jax.models.config import Qwen2VLConfig
from clinkd_jax.models.layers import dense
from clinkd_jax.models.llm import KVCache, Qwen2Model, unstack_layers
from clinkd_jax.models.vision import VisionTransformer
from clinkd_jax.sharding import constrain

Dtype = Any
ATTENTION_LOOPS = ("auto", "per_head", "batched")
DECODE_LAYERS = ("auto", "scan", "unrolled")


def resolve_auto(setting: str, on_cpu: str, elsewhere: str) -> str:
    """A CPU-specific setting: "auto" is `on_cpu` on the CPU backend (where the choice was measured), else
    `elsewhere`; any other value stands."""
    if setting != "auto":
        return setting
    return on_cpu if jax.default_backend() == "cpu" else elsewhere


def scatter_image_features(embeds_bld: jax.Array, is_image_bl: jax.Array, image_feats_bmd: jax.Array) -> jax.Array:
    """Put the m-th merged image token of each sample into that sample's m-th <|image_pad|> position.

    A cumsum-gather rather than a scatter: static shapes, no data-dependent indexing. The host
    pipeline guarantees a sample has no more <|image_pad|> tokens than merged vision tokens.
    """
    idx = jnp.clip(jnp.cumsum(is_image_bl, axis=1) - 1, 0, image_feats_bmd.shape[1] - 1)
    gathered = jnp.take_along_axis(image_feats_bmd, idx[..., None], axis=1)
    return jnp.where(is_image_bl[..., None], gathered.astype(embeds_bld.dtype), embeds_bld)


class Qwen2VL(nn.Module):
    cfg: Qwen2VLConfig
    dtype: Dtype = jnp.float32  # compute dtype (bfloat16 for training on accelerators)
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"  # a name of layers.REMAT_POLICIES, per scanned layer
    scan_unroll: int = 1  # layers per scan iteration (the layer count = fully unrolled); params stay stacked
    # attention (impl "xla", both towers): "per_head" | "batched" | "auto" = per_head on CPU, where it was measured
    attention_loop: str = "auto"
    vision_query_block: int = 0  # vision attention query rows per block; 0 = all at once
    # generation's decode steps: "scan" over the stacked layers | "unrolled" over per-layer params and cache
    # buffers (no copies out of the stacks at every token) | "auto" = unrolled on CPU, where it was measured
    decode_layers: str = "auto"
    stacked_layers: bool = True  # the param layout this instance runs: False for `decode_model`'s unrolled layers

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl, remat=self.remat,
                  scan_unroll=self.scan_unroll)
        t = self.cfg.text
        loop = self.attention_loop
        if loop not in ATTENTION_LOOPS:
            raise ValueError(f"attention_loop={loop!r} is not one of {ATTENTION_LOOPS}")
        if self.decode_layers not in DECODE_LAYERS:
            raise ValueError(f"decode_layers={self.decode_layers!r} is not one of {DECODE_LAYERS}")
        per_head = resolve_auto(loop, "per_head", "batched") == "per_head"
        self.visual = VisionTransformer(self.cfg.vision, t.hidden_size, per_head=per_head,
                                        query_block=self.vision_query_block, **kw)
        self.model = Qwen2Model(t, per_head=per_head, stacked=self.stacked_layers, **kw)
        if not t.tie_word_embeddings:
            self.lm_head = dense(t.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype)

    def __call__(
        self,
        input_ids,
        attention_mask,
        position_ids,
        pixel_values=None,
        vision_position_ids=None,
        vision_segment_ids=None,
        *,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """Returns {"logits" (B, L, V) float32 | "hidden" (B, L, D), "cache": KVCache | None}."""
        x, deepstack = self.embed(input_ids, pixel_values, vision_position_ids, vision_segment_ids)
        hidden, cache = self.model(x, position_ids, attention_mask, cache, deepstack)
        if return_hidden:
            return {"hidden": hidden, "cache": cache}
        return {"logits": self.logits(hidden), "cache": cache}

    def embed(self, input_ids, pixel_values=None, vision_position_ids=None, vision_segment_ids=None):
        """Token embeddings with the merged image features scattered into the <|image_pad|> slots, and the
        DeepStack features (K, B, L, D) at the same slots, zeros elsewhere (None without DeepStack or images)."""
        x = self.model.embed_tokens(input_ids).astype(self.dtype)
        deepstack = None
        if pixel_values is not None:
            feats, stack = self.visual(pixel_values, vision_position_ids, vision_segment_ids)
            is_image = input_ids == self.cfg.image_token_id
            x = scatter_image_features(x, is_image, feats)
            if stack is not None:
                zeros = jnp.zeros_like(x)
                deepstack = jnp.stack([scatter_image_features(zeros, is_image, s) for s in stack])
                deepstack = constrain(deepstack, (None, "batch", "length", "act_embed"))
        return constrain(x, ("batch", "length", "act_embed")), deepstack

    def logits(self, hidden_bld):
        """LM head (tied or untied) in float32. Losses call this on sequence chunks, never on (B, L, V) at once."""
        if self.cfg.text.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden_bld.astype(self.dtype))
        else:
            out = self.lm_head(hidden_bld)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def vision_features(self, pixel_values, vision_position_ids, vision_segment_ids):
        """Merged vision tokens (B, N / merge**2, D): what the LLM receives for each image."""
        return self.visual(pixel_values, vision_position_ids, vision_segment_ids)[0]

    def deepstack_features(self, pixel_values, vision_position_ids, vision_segment_ids):
        """Qwen3-VL's DeepStack features (K, B, N / merge**2, D), for parity checks."""
        return self.visual(pixel_values, vision_position_ids, vision_segment_ids)[1]

    def vision_tower(self, pixel_values, vision_position_ids, vision_segment_ids):
        """ViT output before the merger (B, N, embed_dim), for parity checks and feature extraction."""
        return self.visual.encode(pixel_values, vision_position_ids, vision_segment_ids)


def decode_model(model: Qwen2VL, params) -> tuple[Qwen2VL, Any, Callable[[jax.Array], jax.Array]]:
    """What a decode step runs: (model, params, hidden (B, D) -> float32 logits (B, V)).

    decode_layers="scan" (and "auto" off CPU): the model and params as given. "unrolled": its weights laid out
    for one-token steps once per call, outside the decode loop: the layers' params sliced out of the stack (the
    scan copied them at every token), and the LM head as (V, D) rows, whose logits are one multiply-reduce per
    row (XLA:CPU streams the head faster through a reduce than through its matrix-vector dot). The unrolled
    model takes the KV cache as one buffer per layer (`KVCache.per_layer`)."""
    if resolve_auto(model.decode_layers, "unrolled", "scan") == "scan" or not model.stacked_layers:
        head = lambda h: model.apply({"params": params}, h[:, None], method=Qwen2VL.logits)[:, 0]
        return model, params, head
    t = model.cfg.text
    head_vd = (params["model"]["embed_tokens"]["embedding"] if t.tie_word_embeddings
               else params["lm_head"]["kernel"].T)
    # the barrier makes the copies here, once: without it XLA sinks the slices back into the decode loop
    layers, head_vd = jax.lax.optimization_barrier((unstack_layers(params["model"]), head_vd))
    f32 = jnp.float32  # summed in float32 whatever the weights' dtype (the dot accumulates in float32 too)
    head = lambda h: jnp.sum(h.astype(model.dtype).astype(f32)[:, None, :] * head_vd.astype(f32)[None], axis=-1)
    return model.clone(stacked_layers=False), {**params, "model": layers}, head


# ------------------------------------------------------------------------------ creating params
def dummy_inputs(cfg: Qwen2VLConfig, batch: int = 1, length: int = 8, patches: int = 0) -> dict[str, jax.Array]:
    """Smallest inputs that touch every parameter (used for shape inference and init); `patches` slots per row
    (default: one merge window)."""
    n = patches or cfg.vision.merge_tokens
    return {
        "input_ids": jnp.zeros((batch, length), jnp.int32),
        "attention_mask": jnp.ones((batch, length), jnp.int32),
        "position_ids": jnp.zeros((3, batch, length), jnp.int32),
        "pixel_values": jnp.zeros((batch, n, cfg.vision.patch_dim), jnp.float32),
        "vision_position_ids": jnp.zeros((batch, n, 2), jnp.int32),
        "vision_segment_ids": jnp.ones((batch, n), jnp.int32),
    }


def abstract_params(model: Qwen2VL):
    """The boxed (logically named) parameter tree as ShapeDtypeStructs; nothing is allocated."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(model.cfg)))["params"]


def param_shardings(model: Qwen2VL, mesh, rules=None):
    """NamedShardings of the parameter tree on `mesh` under the logical `rules`."""
    return sharding.tree_shardings(abstract_params(model), mesh, rules or sharding.DEFAULT_RULES)


def init_params(model: Qwen2VL, rng: jax.Array, mesh=None, rules=None):
    """Random parameters created directly on their shards (jit with out_shardings; no host copy)."""
    mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = rules or sharding.DEFAULT_RULES
    shardings = param_shardings(model, mesh, rules)
    init = lambda r: nn.unbox(model.init(r, **dummy_inputs(model.cfg))["params"])
    with sharding.use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)
