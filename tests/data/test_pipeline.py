"""The Grain pipeline over the global batch plan: static shapes per bucket, every sample once per epoch,
determinism, exact resume, hosts that agree on every step, and bad inputs that are counted instead of
stopping the epoch."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

from clinkd_jax.data import pipeline as P
from clinkd_jax.data import plan, positions
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.data.records import TRUNCATED, DataError, SkipLog, Turn, read_medgrit

# several text and patch buckets, shuffled, finite epochs: the shape multi-host runs meet
CFG = P.PipelineConfig(batch_size=4, text_buckets=(112, 128, 256), patch_buckets=(64, 128, 256),
                       image=ImageConfig(max_pixels=224 * 224), read_threads=1)
DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "labels": np.int32, "position_ids": np.int32,
          "decode_offsets": np.int32, "pixel_values": np.float32, "vision_position_ids": np.int32,
          "vision_segment_ids": np.int32, "sample_mask": np.int32, "record_index": np.int64}


def records(demo_dir, name="train.json", **kw):
    return read_medgrit(str(demo_dir / name), str(demo_dir / "images"), **kw)


def cfg_with(**kw):
    return P.PipelineConfig(**{**CFG.__dict__, **kw})


def batches(recs, encoder, cfg=CFG, log=None, **kw):
    return list(P.make_batches(recs, encoder, cfg, log, **kw))


def real(out):
    return np.concatenate([b["record_index"][b["sample_mask"] == 1] for b in out])


def test_shapes_buckets_and_coverage(demo_dir, encoder):
    recs = records(demo_dir)
    it = P.make_batches(recs, encoder, CFG)
    out = list(it)
    shapes = set()
    for b in out:
        assert set(b) == set(DTYPES) and all(b[k].dtype == v for k, v in DTYPES.items())
        bsz, length = b["input_ids"].shape
        n = b["pixel_values"].shape[1]
        assert bsz == 4 and length in CFG.text_buckets and n in CFG.patch_buckets
        assert b["position_ids"].shape == (3, 4, length) and b["vision_segment_ids"].shape == (4, n)
        shapes.add((length, n))
        fill = b["sample_mask"] == 0
        assert (b["attention_mask"][fill] == 0).all() and (b["labels"][fill] == -100).all()
        assert (b["record_index"][fill] == -1).all()
    assert len(shapes) >= 3  # the demo spreads over several buckets: the plan is exercised
    assert sorted(real(out).tolist()) == list(range(len(recs)))  # every record exactly once
    assert len(out) == it.batches_per_epoch


def test_batch_contents_are_consistent(demo_dir, encoder):
    b = batches(records(demo_dir), encoder)[0]
    rows = np.flatnonzero(b["sample_mask"])
    for i in rows:
        n_img_tokens = int((b["input_ids"][i] == CFG.image_token_id).sum())
        assert n_img_tokens * 4 == int((b["vision_segment_ids"][i] > 0).sum())  # one merged token per 4 patches
    grids = []
    for i in range(4):  # recover each sample's grid from its patch positions
        pos = b["vision_position_ids"][i][b["vision_segment_ids"][i] > 0]
        grids.append((1, pos[:, 0].max() + 1, pos[:, 1].max() + 1))
    ref, deltas = positions.get_rope_index(b["input_ids"], grids, b["attention_mask"],
                                           image_token_id=CFG.image_token_id,
                                           gap_in=2, gap_out=2)
    np.testing.assert_array_equal(b["position_ids"], ref)  # MCG-RoPE (ClinKD default gaps)
    np.testing.assert_array_equal(b["decode_offsets"], deltas)


def test_deterministic_for_a_seed(demo_dir, encoder):
    recs = records(demo_dir)
    a, b = batches(recs, encoder), batches(recs, encoder)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    content = lambda bs: [x["input_ids"].tobytes() for x in bs]
    assert content(a) != content(batches(recs, encoder, cfg_with(seed=1)))


def test_two_epochs_reshuffle(demo_dir, encoder):
    recs = records(demo_dir)
    it = P.make_batches(recs, encoder, cfg_with(num_epochs=2))
    out = list(it)
    assert len(out) == 2 * it.batches_per_epoch
    first, second = real(out[: it.batches_per_epoch]), real(out[it.batches_per_epoch:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(len(recs)))
    assert first.tolist() != second.tolist()  # reshuffled


@pytest.mark.parametrize("stop_after", [1, 5, 13, 16])  # 13: the first epoch's last batch; 16: inside epoch 2
def test_resume_is_exact(demo_dir, encoder, stop_after):
    """Stop after k batches, save the state, restore it in a fresh iterator: the rest is identical."""
    recs = records(demo_dir)
    cfg = cfg_with(num_epochs=2)
    straight = batches(recs, encoder, cfg)
    it = P.make_batches(recs, encoder, cfg)
    for _ in range(stop_after):
        next(it)
    state = it.get_state()
    assert len(repr(state)) < 200  # (epoch, batch, plan digest), not arrays
    fresh = P.make_batches(recs, encoder, cfg)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(straight) - stop_after
    for x, y in zip(rest, straight[stop_after:]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("hosts, pack", [(2, False), (4, False), (2, True)])
def test_hosts_agree_on_every_step(demo_dir, encoder, hosts, pack):
    """Each host loads its rows of the same global plan: the same number of batches, the same shapes at
    every step, and their rows put together are the one-host batches. Shuffle on, several buckets, 2 epochs;
    also with packed rows."""
    recs = records(demo_dir)
    cfg = cfg_with(num_epochs=2, batch_size=8, pack=pack)
    whole = batches(recs, encoder, cfg)
    per = 8 // hosts
    parts = [batches(recs, encoder, cfg_with(num_epochs=2, batch_size=8, rows=(h * per, (h + 1) * per), pack=pack))
             for h in range(hosts)]
    assert all(len(p) == len(whole) for p in parts)
    for step, full in enumerate(whole):
        for k in full:
            axis = 1 if k in ("position_ids",) else 0
            assert len({p[step][k].shape[:axis] + p[step][k].shape[axis + 1:] for p in parts}) == 1, (step, k)
            joined = np.concatenate([p[step][k] for p in parts], axis=axis)
            np.testing.assert_array_equal(joined, full[k], err_msg=f"step {step} {k}")


def conversations(out):
    """Every conversation of the batches as (token ids, M-RoPE ids, patches of its image), from the segments
    attention_mask numbers within each row."""
    found = []
    for b in out:
        for i in range(len(b["input_ids"])):
            seg, image = b["attention_mask"][i], b["vision_segment_ids"][i]
            for j in range(1, seg.max() + 1):  # the demo: one image per conversation, in the same order
                at = seg == j
                found.append((tuple(b["input_ids"][i, at]), tuple(b["position_ids"][:, i, at].ravel()),
                              b["pixel_values"][i, image == j].tobytes()))
    return sorted(found)


def test_packing_keeps_every_conversation_whole_and_once(demo_dir, encoder):
    """data.pack: each record once per epoch, in rows whose totals fit a bucket, with the same tokens,
    positions (from 0) and image patches as unpacked, in fewer rows; the first token of each packed
    conversation is no target (the token before it belongs to another conversation)."""
    recs = records(demo_dir)
    room = dict(text_buckets=(112, 128, 256, 512), patch_buckets=(64, 128, 256, 1024))  # a row fits ~4 of them
    plain, packed = batches(recs, encoder, cfg_with(**room)), batches(recs, encoder, cfg_with(pack=True, **room))
    assert conversations(packed) == conversations(plain) and len(conversations(plain)) == len(recs)
    rows = sum(int(b["sample_mask"].sum()) for b in packed)
    assert rows < len(recs) // 2, rows  # demo conversations are short: several share a row
    assert any(b["attention_mask"].max() >= 3 for b in packed)
    for b in packed:
        starts = (b["attention_mask"] > 0) & (np.diff(b["attention_mask"], prepend=0, axis=1) != 0)
        assert (b["labels"][starts] == -100).all()


def test_the_plan_is_the_same_list_everywhere():
    sizes = np.array([[100, 60], [120, 60], [100, 200], [-1, -1], [250, 100], [110, 64], [90, 30]])
    ids = plan.bucket_ids(sizes, (112, 128, 256), (64, 128, 256))
    assert ids[3] == -1 and plan.bucket_shape(ids[4], (112, 128, 256), (64, 128, 256)) == (256, 128)
    a = plan.epoch_batches(ids, 2, seed=3, epoch=1, shuffle=True, drop_remainder=False)
    b = plan.epoch_batches(ids, 2, seed=3, epoch=1, shuffle=True, drop_remainder=False)
    assert [(x, y.tolist()) for x, y in a] == [(x, y.tolist()) for x, y in b]
    assert sorted(i for _, y in a for i in y) == [0, 1, 2, 4, 5, 6]
    assert len(a) == plan.batches_per_epoch(ids, 2, False)
    kept = plan.epoch_batches(ids, 2, seed=3, epoch=1, shuffle=True, drop_remainder=True)
    assert all(len(y) == 2 for _, y in kept) and len(kept) == plan.batches_per_epoch(ids, 2, True)


def test_sizes_are_measured_once(demo_dir, encoder, tmp_path, caplog):
    recs = records(demo_dir)
    cache = str(tmp_path / "sizes.json")
    with caplog.at_level(logging.INFO, logger="clinkd_jax.data"):
        first = batches(recs, encoder, sizes_cache=cache)
        again = batches(recs, encoder, sizes_cache=cache)
        other = batches(recs, encoder, cfg_with(image=ImageConfig(max_pixels=112 * 112)), sizes_cache=cache)
    measured = [r.getMessage() for r in caplog.records if r.getMessage().startswith("measured")]
    assert measured == [f"measured {len(recs)} of {len(recs)} records (0 cached)",
                        f"measured 0 of {len(recs)} records ({len(recs)} cached)",  # the second run reads the cache
                        f"measured {len(recs)} of {len(recs)} records (0 cached)"]  # another image budget: measured
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(first, again) for k in x)
    assert {b["pixel_values"].shape[1] for b in other} != {b["pixel_values"].shape[1] for b in first}


def test_bad_inputs_are_counted_not_fatal(demo_dir, encoder, tmp_path, caplog):
    """A corrupt image, an image deleted after reading the file list and an over-long conversation are left
    out of the plan; an image whose header reads but whose pixels do not becomes a filler row when loaded.
    Every epoch finishes, each is counted by reason; strict mode stops at the first, naming the item."""
    d = tmp_path / "data"
    shutil.copytree(demo_dir, d)
    recs = records(d)
    (d / "images" / f"{recs[0].id}.png").write_bytes(b"not a png")
    (d / "images" / f"{recs[1].id}.png").unlink()
    png = (d / "images" / f"{recs[2].id}.png").read_bytes()
    (d / "images" / f"{recs[2].id}.png").write_bytes(png[: len(png) // 2])  # truncated: header fine, pixels not
    recs[3] = dataclasses.replace(recs[3], turns=(recs[3].turns[0], Turn("assistant", "word " * 400)))
    log = SkipLog()
    with caplog.at_level(logging.INFO, logger="clinkd_jax.data"):
        it = P.make_batches(recs, encoder, cfg_with(num_epochs=2), log)
        out = list(it)
    assert len(out) == 2 * it.batches_per_epoch
    assert it.plan_skips == {"unreadable image": 2, "longer than the longest text bucket": 1}
    assert it.load_skips == {"unreadable image": 2}  # the truncated file, once per epoch
    assert any(e.startswith(f"{recs[0].source}: unreadable image") for e in log.examples["unreadable image"])
    kept = sum(int(b["sample_mask"].sum()) for b in out)
    assert kept == 2 * (len(recs) - 3) - 2
    assert it.skips_all_hosts() == dict(log.counts) == {"unreadable image": 4, "longer than the longest text bucket": 1}
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch")]
    assert len(ends) == 2 and ends[-1] == f"epoch 2 ({it.batches_per_epoch} batches): {log.report()}"
    with pytest.raises(DataError, match="unreadable image"):
        batches(recs, encoder, cfg_with(strict=True, shuffle=False))


def test_one_item_of_each_bad_kind_in_a_file(demo_dir, encoder, tmp_path, monkeypatch, caplog):
    """One training file holding good items and one item of each bad kind (a literal <|image_pad|>, a bad box,
    a missing, a corrupt and a half-written image, a first exchange too long, a conversation whose later
    exchanges do not fit, a failure inside per-item preprocessing): both epochs complete, every kind is counted
    under its own reason and listed in the report; the long conversation trains on the exchanges that fit."""
    d = tmp_path / "data"
    shutil.copytree(demo_dir, d)
    good = json.load(open(d / "train.json"))[:6]
    stem = good[0]["id"]
    for name, data in (("ct_00--corrupt--x", b"not an image"),
                       ("ct_00--half--x", (d / "images" / f"{stem}.png").read_bytes()[:2000])):
        (d / "images" / f"{name}.png").write_bytes(data)

    def item(image, *turns):
        return {"id": image, "conversations": [{"from": r, "value": v} for r,
                                               v in zip(("user", "assistant") * 9, turns)]}

    bad = [item(stem, "What is at <|image_pad|>?", "a cyst"), item(stem, "Where?", "<box>(50,5),(1,1)</box>"),
           item("ct_00--nowhere--x", "Where?", "here"), item("ct_00--corrupt--x", "Where?", "here"),
           item("ct_00--half--x", "Where?", "here"), item(stem, "Describe.", "word " * 400),
           item(stem, "Name the zebra.", "zebra"),  # fails inside preprocessing (below)
           item(stem, "Where is the cyst?", "in the middle", "And now?", "word " * 400, "Again?", "word " * 10)]
    (d / "train.json").write_text(json.dumps(good + bad))
    zebra = encoder._ids(" zebra")[0]
    rope = positions.get_rope_index

    def failing_rope(ids, *a, **kw):  # a position error for one item, as a bug or odd input could raise
        if (ids == zebra).any():
            raise IndexError("position ids out of range")
        return rope(ids, *a, **kw)

    monkeypatch.setattr(positions, "get_rope_index", failing_rope)
    log = SkipLog()
    recs = records(d, log=log)
    with caplog.at_level(logging.INFO, logger="clinkd_jax.data"):
        it = P.make_batches(recs, encoder, cfg_with(num_epochs=2), log)
        out = list(it)
    assert len(out) == 2 * it.batches_per_epoch
    assert dict(log.counts) == {"special token in text": 1, "bad box": 1, "missing image file": 1,
                                "unreadable image": 1 + 2, "longer than the longest text bucket": 1,
                                "preprocessing error": 2, TRUNCATED: 1}
    assert log.total == 9  # the shortened conversation is counted, not skipped
    report = log.report()
    assert "9 item(s) skipped:" in report and "1 item(s) shortened (kept in part):" in report
    assert all(reason in report for reason in log.counts)
    assert "IndexError: position ids out of range" in "".join(log.examples["preprocessing error"])
    assert log.examples[TRUNCATED] == [f"{recs[-1].source}: {TRUNCATED} (kept 1 of 3 exchanges)"]
    long = len(recs) - 1
    row = [b["labels"][i] for b in out for i in np.flatnonzero(b["record_index"] == long)][0]
    assert encoder.tok.decode(row[row >= 0]) == "in the middle<|im_end|>\n"  # the exchange that fits, whole
    assert any(r.getMessage().startswith("epoch 2") and TRUNCATED in r.getMessage() for r in caplog.records)


def test_config_errors(demo_dir, encoder):
    recs = records(demo_dir)
    with pytest.raises(ValueError, match="patch_buckets \\(130,\\) must be multiples of 4"):
        P.make_batches(recs, encoder, P.PipelineConfig(patch_buckets=(130,)))
    with pytest.raises(ValueError, match="rows \\(2, 6\\) are not a part of a global batch of 4"):
        P.make_batches(recs, encoder, cfg_with(rows=(2, 6)))
    with pytest.raises(ValueError, match="no batch can be formed: 0 usable of 3 records"):
        P.make_batches(recs[:3], encoder, cfg_with(text_buckets=(16,)))
