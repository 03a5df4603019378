"""Host-side position ids: Qwen2-VL's get_rope_index (gaps 1/1) and ClinKD's MCG-RoPE (gaps 2/2)."""

import numpy as np
import pytest
import reference as R

from clinkd_jax.data import positions as P

T, VS, VE, I = 7, R.VSTART, R.VEND, R.IMAGE


def rope(ids, grids, mask=None, gaps=(1, 1)):
    return P.get_rope_index(np.asarray(ids)[None] if np.ndim(ids) == 1 else np.asarray(ids), grids, mask,
                            image_token_id=I, gap_in=gaps[0], gap_out=gaps[1])


def test_clinkd_spec_worked_example():
    """clinkd-spec §1.3: 3 text, <|vision_start|>, a 2x3 merged image, <|vision_end|>, 2 text."""
    ids = [T, T, T, VS] + [I] * 6 + [VE, T, T]
    grid = [(1, 4, 6)]  # patches; merged 2 x 3
    up, d_up = rope(ids, grid)
    ck, d_ck = rope(ids, grid, gaps=P.CLINKD_GAPS)
    np.testing.assert_array_equal(up[:, 0], [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9],
    ])
    np.testing.assert_array_equal(ck[:, 0], [
        [0, 1, 2, 3, 5, 5, 5, 5, 5, 5, 9, 10, 11],
        [0, 1, 2, 3, 5, 5, 5, 6, 6, 6, 9, 10, 11],
        [0, 1, 2, 3, 5, 6, 7, 5, 6, 7, 9, 10, 11],
    ])
    assert d_up.tolist() == [-3] and d_ck.tolist() == [-1]


def test_batch_resets_per_sample():
    """The released ClinKD function crashes on a batch's second sample; each sample must start afresh."""
    ids = [T, VS] + [I] * 4 + [VE, T]
    batch = np.array([ids, ids, [T] * len(ids)])
    pos, deltas = rope(batch, [(1, 4, 4), (1, 4, 4)], gaps=P.CLINKD_GAPS)
    np.testing.assert_array_equal(pos[:, 0], pos[:, 1])
    np.testing.assert_array_equal(pos[:, 2], np.tile(np.arange(len(ids)), (3, 1)))  # text only: plain 1-D
    assert deltas.tolist() == [deltas[0], deltas[0], 0]


@pytest.mark.parametrize("seed", range(5))
def test_clinkd_is_upstream_plus_one_per_modality_change(seed):
    """Property: MCG-RoPE (2/2) = Qwen2-VL (1/1) + 1 for every image start or end already passed."""
    rng = np.random.default_rng(seed)
    ids, grids, changes = [], [], []
    shift = 0
    for _ in range(rng.integers(1, 4)):
        n_text = int(rng.integers(1, 5))
        ids += [T] * n_text
        changes += [shift] * n_text
        g = (1, 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)))
        grids.append(g)
        shift += 1
        n_img = g[1] * g[2] // 4
        ids += [I] * n_img
        changes += [shift] * n_img
        shift += 1
    ids += [T, T]
    changes += [shift] * 2
    up, _ = rope(ids, grids)
    ck, _ = rope(ids, grids, gaps=P.CLINKD_GAPS)
    np.testing.assert_array_equal(ck[:, 0] - up[:, 0], np.tile(changes, (3, 1)))


def test_padding_and_decode_offset():
    """Left and right padding give the same real positions; the next decode position is max + 1."""
    ids = [T, T, VS] + [I] * 4 + [VE, T]
    n, length = len(ids), len(ids) + 3
    right = np.full((1, length), 0); right[0, :n] = ids
    left = np.full((1, length), 0); left[0, -n:] = ids
    mr = (np.arange(length) < n)[None].astype(int)
    ml = mr[:, ::-1]
    for gaps in (P.QWEN2VL_GAPS, P.CLINKD_GAPS):
        pr, dr = rope(right, [(1, 4, 4)], mr, gaps)
        pl, dl = rope(left, [(1, 4, 4)], ml, gaps)
        np.testing.assert_array_equal(pr[:, 0, :n], pl[:, 0, -n:])
        assert (pl[:, 0, :3] == 0).all() and (pr[:, 0, n:] == 0).all()  # padding = 0 (transformers 5)
        nxt = P.decode_position_ids(length, dl, 2)  # left padded: next cache slot = padded length
        assert nxt[:, 0].tolist() == [[pl.max() + 1, pl.max() + 2]] * 3


def test_matches_transformers_golden():
    """Positions equal transformers' get_rope_index on the reference batch (golden file, both envs).

    Decode offsets: transformers 5 counts only valid tokens (delta_hf = max+1-L_valid) and adds the
    running mask count while decoding; ours uses the padded length with the cache slot. Both put the
    next token at max + 1, i.e. delta_ours = delta_hf - (number of padding tokens)."""
    inputs, outputs = R.load_golden("gqa2_untied")
    x, deltas = R.jax_inputs(inputs)
    np.testing.assert_array_equal(x["position_ids"], outputs["position_ids"])
    n_pad = (inputs["attention_mask"] == 0).sum(1)
    np.testing.assert_array_equal(deltas, outputs["rope_deltas"] - n_pad)


def _random_batch(rng, batch=4, length=40):
    rows, masks, grids = [], [], []
    for _ in range(batch):
        ids, g_list = [], []
        if rng.random() < 0.3:  # image first
            g = (1, 2, 2 * int(rng.integers(1, 3)))
            g_list.append(g); ids += [VS] + [I] * (g[1] * g[2] // 4) + [VE]
        for _ in range(int(rng.integers(0, 3))):
            ids += [T] * int(rng.integers(1, 4))
            g = (1, 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3)))
            g_list.append(g); ids += [VS] + [I] * (g[1] * g[2] // 4) + [VE]
        ids += [T] * int(rng.integers(1, 4))
        ids = ids[:length]
        pad = length - len(ids)
        left = rng.random() < 0.5
        row = [0] * pad + ids if left else ids + [0] * pad
        mask = [0] * pad + [1] * len(ids) if left else [1] * len(ids) + [0] * pad
        n_img = sum(1 for a, b in zip(ids, ids[1:]) if a == VS and b == I)
        rows.append(row); masks.append(mask); grids += g_list[:n_img]
    return np.array(rows), np.array(masks), np.array(grids).reshape(-1, 3)


@pytest.mark.torch
@pytest.mark.parametrize("seed", range(6))
def test_matches_transformers_live(seed):
    """Random batches (padding on either side, 0-3 images anywhere, text-only samples) vs transformers."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration._from_config(R.hf_config("gqa2_untied"))
    ids, mask, grids = _random_batch(np.random.default_rng(seed))
    ti = torch.from_numpy(ids)
    ref_pos, ref_delta = model.model.get_rope_index(
        ti, (ti == I).int(), torch.from_numpy(grids) if len(grids) else None, None, torch.from_numpy(mask)
    )
    pos, delta = rope(ids, grids, mask)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1) - (mask == 0).sum(1))


def test_vision_patch_positions_merge_window_order():
    """4x4 patches, 2x2 merge: each window's four patches are consecutive, windows row-major."""
    pos = P.vision_patch_positions((1, 4, 4))
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos.shape == (16, 2) and len({tuple(p) for p in pos}) == 16


@pytest.mark.torch
def test_vision_patch_positions_match_transformers():
    import torch
    from transformers.vision_utils import get_vision_position_ids

    grids = [(1, 4, 6), (1, 6, 4), (2, 2, 2)]
    ref = get_vision_position_ids(torch.tensor(grids), 2).numpy()
    ours = np.concatenate([P.vision_patch_positions(g) for g in grids])
    np.testing.assert_array_equal(ours, ref)


def test_pack_vision_inputs_segments_and_overflow():
    a, b = np.ones((16, 1176), np.float32), 2 * np.ones((8, 1176), np.float32)
    out = P.pack_vision_inputs([[(a, (1, 4, 4)), (b, (1, 2, 4))], []], 28)
    assert out["vision_segment_ids"][0].tolist() == [1] * 16 + [2] * 8 + [0] * 4
    assert (out["vision_segment_ids"][1] == 0).all()
    assert out["pixel_values"][0, 20, 0] == 2 and out["pixel_values"][0, 25, 0] == 0
    with pytest.raises(P.PositionError, match="sample 0: its images need more than num_patches=20"):
        P.pack_vision_inputs([[(a, (1, 4, 4)), (b, (1, 2, 4))]], 20)


@pytest.mark.parametrize(
    "ids, grids, message",
    [
        ([T, I, I, T], [(1, 4, 4)],
         r"sample 0: image 0 with grid \(1, 4, 4\) needs 4 image tokens at index 1, found 2"),
        ([T, I, I, I, I], [], "sample 0: image token at index 1 but no image grid is left"),
        ([T, I, I, I, I], [(1, 4, 4), (1, 2, 2)], "2 image grids given but the batch holds only 1 images"),
        ([T, I, I, I], [(1, 3, 4)], "not divisible by spatial_merge_size=2"),
    ],
)
def test_bad_inputs_name_the_sample(ids, grids, message):
    with pytest.raises(P.PositionError, match=message):
        rope(ids, grids)
