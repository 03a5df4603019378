"""Host-side (NumPy) position ids: M-RoPE / MCG-RoPE ids for the LLM, (row, col) ids and segment ids
for the vision tower. Computed in the input pipeline, never inside a jitted step.

MCG-RoPE (ClinKD, clinkd-spec §1.3) differs from Qwen2-VL only in the gaps at modality changes:
  * `gap_in`:  first visual position = (largest position so far) + gap_in   (Qwen2-VL: 1, ClinKD: 2)
  * `gap_out`: first text position after an image = (largest so far) + gap_out (Qwen2-VL: 1, ClinKD: 2)
Text after text steps by 1 and positions inside an image are unchanged. The released ClinKD function
forgets to reset its "last segment was visual" flag between samples (it crashes on the second sample
of a batch); here every sample starts afresh.

Conventions (same as transformers 5.x `get_rope_index`): padding positions get 0 and are ignored under
the attention mask. The decode offset differs in convention, not in effect: ours is
`delta = max(P) + 1 - L_padded`, so a token written at KV-cache slot c gets position c + delta;
transformers stores `max(P) + 1 - L_valid` and adds it to the cumulative attention-mask count. With
left-padded prompts both put the first generated token at max(P) + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clinkd_jax.errors import UserError

QWEN2VL_GAPS = (1, 1)
CLINKD_GAPS = (2, 2)


class PositionError(UserError):
    """Token ids and image grids that do not describe each other."""

    kind = "data"


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    gap_in: int = 1,
    gap_out: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, L) int32 position ids and (B,) int32 decode offsets for a padded batch.

    `image_grid_thw` lists (t, h, w) patch grids of every image in the batch, in order of appearance
    (sample by sample), like the Qwen2-VL image processor returns them. Each image occupies
    t * (h / merge) * (w / merge) consecutive `image_token_id` tokens.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise PositionError(f"input_ids must be (B, L), got shape {input_ids.shape}")
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    grids = grids.reshape(-1, 3)
    positions = np.zeros((3, b, length), np.int32)
    deltas = np.zeros((b,), np.int32)
    next_image = 0
    for i in range(b):
        ids = input_ids[i][mask[i]]
        try:
            pos, next_image = _sample_positions(
                ids, grids, next_image, image_token_id, spatial_merge_size, gap_in, gap_out
            )
        except PositionError as e:
            raise PositionError(f"sample {i}: {e}") from None
        positions[:, i, mask[i]] = pos
        deltas[i] = (pos.max() + 1 if pos.size else 0) - length
    if next_image != len(grids):
        raise PositionError(f"{len(grids)} image grids given but the batch holds only {next_image} images")
    return positions, deltas


def _sample_positions(ids, grids, next_image, image_token_id, merge, gap_in, gap_out):
    """Positions (3, n) of one unpadded sample; returns them and the index of the next unused grid."""
    n = len(ids)
    out = np.zeros((3, n), np.int64)
    is_image = ids == image_token_id
    cur_max, i, after_image = -1, 0, False
    while i < n:
        j = i + int(np.argmax(is_image[i:])) if is_image[i:].any() else n
        if j > i:  # a text segment [i, j)
            start = cur_max + (gap_out if after_image else 1)
            out[:, i:j] = start + np.arange(j - i)
            cur_max, after_image = start + (j - i) - 1, False
        if j == n:
            break
        if next_image >= len(grids):
            raise PositionError(f"image token at index {j} but no image grid is left for it")
        gt, gh, gw = (int(x) for x in grids[next_image])
        if gh % merge or gw % merge:
            raise PositionError(f"image grid {(gt, gh, gw)} is not divisible by spatial_merge_size={merge}")
        gh, gw = gh // merge, gw // merge
        count = gt * gh * gw
        run = ids[j : j + count]
        if len(run) < count or not (run == image_token_id).all():
            have = int(np.argmin(np.append(is_image[j:], False)))
            raise PositionError(f"image {next_image} with grid {(gt, gh * merge, gw * merge)} needs {count} image "
                                f"tokens at index {j}, found {have}")
        base = cur_max + gap_in
        tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
        out[:, j : j + count] = base + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        cur_max, after_image = base + max(gt, gh, gw) - 1, True
        i, next_image = j + count, next_image + 1
    return out, next_image


def decode_position_ids(cache_index: int, decode_offsets: np.ndarray, num_tokens: int = 1) -> np.ndarray:
    """(3, B, T) position ids for tokens written at KV-cache slots cache_index .. cache_index+T-1."""
    slots = cache_index + np.arange(num_tokens)
    pos = slots[None, :] + np.asarray(decode_offsets)[:, None]
    return np.broadcast_to(pos[None], (3, *pos.shape)).astype(np.int32)


# ------------------------------------------------------------------------------------------ vision
def vision_patch_positions(grid_thw: Sequence[int], spatial_merge_size: int = 2) -> np.ndarray:
    """(t*h*w, 2) (row, col) ids of one image's patches in merge-window order (the processor's order)."""
    t, h, w = (int(x) for x in grid_thw)
    m = spatial_merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # (h/m, m, w/m, m) -> windows first, then the m x m patches inside a window
    rows = rows.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)


def pack_vision_inputs(
    samples: Sequence[Sequence[tuple[np.ndarray, Sequence[int]]]],
    num_patches: int,
    spatial_merge_size: int = 2,
    dtype=np.float32,
    patch_dim: int | None = None,
) -> dict[str, np.ndarray]:
    """Pack each sample's images into one static (N, patch_dim) buffer.

    `samples[b]` lists (patches (n, patch_dim), grid_thw) for the images of sample b, in order.
    Returns pixel_values (B, N, patch_dim), vision_position_ids (B, N, 2), vision_segment_ids (B, N)
    with segment 1, 2, ... per image and 0 for padding. `patch_dim` (the model's) shapes a batch without images;
    by default it is read from the images (1176, Qwen2-VL's, when there are none).
    """
    m2 = spatial_merge_size**2
    if num_patches % m2:
        raise PositionError(f"num_patches={num_patches} must be a multiple of spatial_merge_size**2={m2}")
    patch_dim = patch_dim or next((p.shape[1] for s in samples for p, _ in s), 3 * 2 * 14 * 14)
    b = len(samples)
    pixels = np.zeros((b, num_patches, patch_dim), dtype)
    pos = np.zeros((b, num_patches, 2), np.int32)
    seg = np.zeros((b, num_patches), np.int32)
    for i, images in enumerate(samples):
        at = 0
        for k, (patches, grid) in enumerate(images):
            n = int(np.prod(grid))
            if patches.shape != (n, patch_dim):
                raise PositionError(f"sample {i} image {k}: patches {patches.shape} do not match grid {tuple(grid)}")
            if at + n > num_patches:
                raise PositionError(f"sample {i}: its images need more than num_patches={num_patches} patches")
            pixels[i, at : at + n] = patches
            pos[i, at : at + n] = vision_patch_positions(grid, spatial_merge_size)
            seg[i, at : at + n] = k + 1
            at += n
    return {"pixel_values": pixels, "vision_position_ids": pos, "vision_segment_ids": seg}
