"""The Grain pipeline: static shapes per bucket, every sample once per epoch, determinism, exact resume,
per-host sharding, and bad inputs that are counted instead of stopping the epoch."""

import shutil

import numpy as np
import pytest

from clinkd_jax.data import pipeline as P
from clinkd_jax.data import positions
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.data.records import DataError, SkipLog, read_medgrit

CFG = P.PipelineConfig(batch_size=4, text_buckets=(128, 256), patch_buckets=(128, 256),
                       image=ImageConfig(max_pixels=224 * 224), read_threads=1)
DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "labels": np.int32, "position_ids": np.int32,
          "decode_offsets": np.int32, "pixel_values": np.float32, "vision_position_ids": np.int32,
          "vision_segment_ids": np.int32, "sample_mask": np.int32, "index": np.int64, "record_index": np.int64}


def records(demo_dir, name="train.json", **kw):
    return read_medgrit(str(demo_dir / name), str(demo_dir / "images"), **kw)


def batches(recs, encoder, cfg=CFG, log=None):
    return list(P.make_batches(recs, encoder, cfg, log))


def test_shapes_buckets_and_coverage(demo_dir, encoder):
    recs = records(demo_dir)
    out = batches(recs, encoder)
    shapes = set()
    for b in out:
        assert set(b) == set(DTYPES) and all(b[k].dtype == v for k, v in DTYPES.items())
        bsz, length = b["input_ids"].shape
        n = b["pixel_values"].shape[1]
        assert bsz == 4 and length in CFG.text_buckets and n in CFG.patch_buckets
        assert b["position_ids"].shape == (3, 4, length) and b["vision_segment_ids"].shape == (4, n)
        shapes.add((length, n))
        real = b["sample_mask"].astype(bool)
        assert (b["attention_mask"][~real] == 0).all() and (b["labels"][~real] == -100).all()
    assert len(shapes) <= len(CFG.text_buckets) * len(CFG.patch_buckets)
    seen = np.concatenate([b["index"][b["sample_mask"] == 1] for b in out])
    assert sorted(seen.tolist()) == list(range(len(recs)))  # every sample exactly once
    rec = np.concatenate([b["record_index"][b["sample_mask"] == 1] for b in out])
    assert sorted(rec.tolist()) == list(range(len(recs)))


def test_batch_contents_are_consistent(demo_dir, encoder):
    b = batches(records(demo_dir), encoder)[0]
    for i in range(4):
        n_img_tokens = int((b["input_ids"][i] == CFG.image_token_id).sum())
        assert n_img_tokens * 4 == int((b["vision_segment_ids"][i] > 0).sum())  # one merged token per 4 patches
    grids = []
    for i in range(4):  # recover each sample's grid from its patch positions
        pos = b["vision_position_ids"][i][b["vision_segment_ids"][i] > 0]
        grids.append((1, pos[:, 0].max() + 1, pos[:, 1].max() + 1))
    ref, deltas = positions.get_rope_index(b["input_ids"], grids, b["attention_mask"], image_token_id=CFG.image_token_id,
                                           gap_in=2, gap_out=2)
    np.testing.assert_array_equal(b["position_ids"], ref)  # MCG-RoPE (ClinKD default gaps)
    np.testing.assert_array_equal(b["decode_offsets"], deltas)


def test_deterministic_for_a_seed(demo_dir, encoder):
    recs = records(demo_dir)
    a, b = batches(recs, encoder), batches(recs, encoder)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    other = batches(recs, encoder, P.PipelineConfig(**{**CFG.__dict__, "seed": 1}))
    content = lambda bs: [x["input_ids"].tobytes() for x in bs]
    assert content(a) != content(other)


def test_two_epochs_reshuffle(demo_dir, encoder):
    recs = records(demo_dir)
    out = batches(recs, encoder, P.PipelineConfig(**{**CFG.__dict__, "num_epochs": 2}))
    idx = np.concatenate([b["index"][b["sample_mask"] == 1] for b in out])
    assert sorted(idx.tolist()) == list(range(2 * len(recs)))


@pytest.mark.parametrize("stop_after", [1, 5, 12])
def test_resume_is_exact(demo_dir, encoder, stop_after):
    """Stop after k batches, save the state, restore it in a fresh iterator: the rest is identical."""
    recs = records(demo_dir)
    straight = batches(recs, encoder)
    it = P.make_batches(recs, encoder, CFG)
    for _ in range(stop_after):
        next(it)
    state = it.get_state()
    assert len(repr(state)) < 2000  # indices, not arrays
    fresh = P.make_batches(recs, encoder, CFG)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(straight) - stop_after
    for x, y in zip(rest, straight[stop_after:]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_hosts_get_disjoint_shares(demo_dir, encoder):
    recs = records(demo_dir)
    ids = []
    for host in range(2):
        cfg = P.PipelineConfig(**{**CFG.__dict__, "shard_index": host, "shard_count": 2, "shuffle": False})
        out = batches(recs, encoder, cfg)
        ids.append({recs[host + 2 * int(i)].id for b in out for i in b["index"][b["sample_mask"] == 1]})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(recs)


def test_bad_inputs_are_counted_not_fatal(demo_dir, encoder, tmp_path, caplog):
    """A corrupt image, an image deleted after reading the file list, and an over-long conversation:
    the epoch finishes, each is counted by reason; strict mode stops at the first, naming the item."""
    d = tmp_path / "data"
    shutil.copytree(demo_dir, d)
    recs = records(d)
    (d / "images" / f"{recs[0].id}.png").write_bytes(b"not a png")
    (d / "images" / f"{recs[1].id}.png").unlink()
    long_cfg = P.PipelineConfig(**{**CFG.__dict__, "text_buckets": (64, 100)})
    log = SkipLog()
    out = batches(recs, encoder, long_cfg, log)
    assert log.counts["unreadable image"] == 2
    assert log.counts["longer than the longest text bucket"] >= 1
    kept = sum(int(b["sample_mask"].sum()) for b in out)
    assert kept + log.total == len(recs)
    assert any(e.startswith(f"{recs[0].source}: unreadable image") for e in log.examples["unreadable image"])
    assert "unreadable image" in log.report()
    ends = [r.getMessage() for r in caplog.records if r.name == "clinkd_jax.data"]
    assert ends == [f"epoch 1 of this host's data: {log.report()}"]  # reported once, at the end of the epoch
    with pytest.raises(DataError, match="unreadable image"):
        batches(recs, encoder, P.PipelineConfig(**{**long_cfg.__dict__, "strict": True, "shuffle": False}))


def test_config_errors(demo_dir, encoder):
    recs = records(demo_dir)
    with pytest.raises(ValueError, match="patch_buckets \\(130,\\) must be multiples of 4"):
        P.make_batches(recs, encoder, P.PipelineConfig(patch_buckets=(130,)))
    with pytest.raises(ValueError, match="3 records cannot be shared by 4 hosts"):
        P.make_batches(recs[:3], encoder, P.PipelineConfig(shard_count=4))
