"""The alignment projector: the PatchMerger (LayerNorm, or RMSNorm in Qwen2.5-VL -> 2x2 spatial merge -> MLP).
Qwen3-VL's DeepStack mergers normalise after the merge ("postshuffle"), over the 4 patches side by side."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clinkd_jax.models.config import VisionConfig
from clinkd_jax.models.layers import RMSNorm, dense, layer_norm
from clinkd_jax.sharding import constrain

Dtype = Any


def vision_norm(cfg: VisionConfig, name: str, *, dtype, param_dtype):
    """The tower's and merger's norm: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), same eps."""
    if cfg.norm == "rms_norm":
        return RMSNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)
    return layer_norm(cfg.layer_norm_eps, name=name, dtype=dtype, param_dtype=param_dtype)


class PatchMerger(nn.Module):
    """(B, N, embed_dim) patches in merge-window order -> (B, N / merge**2, out_dim) LLM tokens."""

    cfg: VisionConfig
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    postshuffle_norm: bool = False  # normalise after the merge, over m * embed_dim (Qwen3-VL's DeepStack)

    @nn.compact
    def __call__(self, x_bne: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, e = x_bne.shape
        m = self.cfg.merge_tokens
        x = x_bne if self.postshuffle_norm else vision_norm(self.cfg, "ln_q", **kw)(x_bne)
        x = x.reshape(b, n // m, m * e)  # the m consecutive patches of one merge window side by side
        if self.postshuffle_norm:
            x = vision_norm(self.cfg, "ln_q", **kw)(x)
        x = dense(m * e, ("merger_in", "merger_mlp"), name="mlp_0", **kw)(x)
        x = constrain(jax.nn.gelu(x, approximate=False), ("batch", "patches", "act_mlp"))
        return dense(self.out_dim, ("merger_mlp", "embed"), name="mlp_2", **kw)(x)
