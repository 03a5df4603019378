"""Rotary embeddings: 2-D (row, column) for the vision tower, multimodal M-RoPE for the LLM.

MCG-RoPE (ClinKD) changes only the position *ids* (see `clinkd_jax.data.positions`); the rotation
applied here is Qwen2-VL's, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float) -> jax.Array:
    """theta^(-2i/dim) for i < dim/2, float32."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate-half RoPE on (B, T, N, H) with per-token angles (B, T, H); float32 math, x's dtype out."""
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    xf = x_btnh.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x_btnh.dtype)


def mrope_axes(head_dim: int, mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
    """Which position row (0 = t, 1 = h, 2 = w) each of the head_dim/2 frequencies takes its angle from.

    Chunked (Qwen2-VL): `mrope_section` consecutive runs, e.g. [16, 24, 24]. Interleaved (Qwen3-VL): frequency i
    takes h when i % 3 == 1 and i < 3 * section[1], w when i % 3 == 2 and i < 3 * section[2], else t."""
    half = head_dim // 2
    if not interleaved:
        return np.repeat(np.arange(3), mrope_section)[:half]
    i = np.arange(half)
    axes = np.zeros(half, np.int64)
    for axis in (1, 2):
        axes[(i % 3 == axis) & (i < 3 * mrope_section[axis])] = axis
    return axes


def mrope_cos_sin(
    position_ids_3bt: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...],
    interleaved: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Multimodal RoPE: frequency i of the head_dim/2 takes its angle from position row `mrope_axes(...)[i]`
    (t, h or w), and the result is duplicated for the rotate-half pairing. Returns cos, sin of shape
    (B, T, head_dim), float32."""
    inv = inv_frequencies(head_dim, theta)  # (H/2,)
    pos = position_ids_3bt.astype(jnp.float32)[mrope_axes(head_dim, mrope_section, interleaved)]  # (H/2, B, T)
    angles = jnp.moveaxis(pos, 0, -1) * inv  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def vision_cos_sin(position_hw_bn2: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D rotary for the ViT: head_dim/4 frequencies for the row id, the same for the column id.

    Angles are [row*f, col*f] (head_dim/2 values), duplicated for rotate-half. (B, N, head_dim) float32.
    """
    inv = inv_frequencies(head_dim // 2, theta)  # (head_dim/4,)
    pos = position_hw_bn2.astype(jnp.float32)
    angles = jnp.concatenate([pos[..., 0:1] * inv, pos[..., 1:2] * inv], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
