"""The generation prompt contract (clinkd-spec §3.5) and left-padded static batches."""

import os

import numpy as np
import pytest

from clinkd_jax.data import records
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.infer import prompts as P

CFG = P.PromptConfig(batch_size=4, text_buckets=(128, 256), patch_buckets=(256, 1024),
                     image=ImageConfig(min_pixels=112 * 112, max_pixels=224 * 224))


def vg_records(demo_dir, n=None):
    return records.read_medgrit(os.path.join(demo_dir, "Test_VG.json"), os.path.join(demo_dir, "images"))[:n]


def test_prompt_contract(demo_dir, encoder):
    rec = vg_records(demo_dir, 1)[0]
    assert "<img>" in rec.question and "<ref>" in rec.question
    s = P.build_prompt(rec, encoder, CFG)
    text = encoder.tok.decode(s["input_ids"], skip_special_tokens=False)
    n_img = s["n_patches"] // 4
    question = rec.question.split("</img>")[1].strip()
    question = question.replace("<ref>", "<|object_ref_start|>").replace("</ref>", "<|object_ref_end|>")
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * n_img + "<|vision_end|>" + question + "<|im_end|>\n<|im_start|>assistant\n")
    assert text == expected  # image first, tag removed, markup -> Qwen2-VL tokens, generation prompt added


def test_eval_pixel_budget(demo_dir, encoder):
    rec = vg_records(demo_dir, 1)[0]
    for lo, hi in ((112 * 112, 224 * 224), (512 * 512, 1024 * 1024)):
        cfg = P.PromptConfig(image=ImageConfig(min_pixels=lo, max_pixels=hi), text_buckets=(8192,),
                             patch_buckets=(8192,))
        n = P.build_prompt(rec, encoder, cfg)["n_patches"]
        assert lo <= n * 14 * 14 <= hi  # each patch covers 14x14 pixels of the resized image


def test_left_padded_batches(demo_dir, encoder):
    log = records.SkipLog()
    batches = list(P.prompt_batches(vg_records(demo_dir, 6), encoder, CFG, log))
    assert sum(len(r) for r, _ in batches) == 6
    for recs, b in batches:
        real = b["attention_mask"].astype(bool)
        assert real[: len(recs), -1].all()  # every real row ends at the last slot
        for i in range(len(recs)):
            n = real[i].sum()
            assert not real[i, : -n].any()  # padding on the left only
            assert b["decode_offsets"][i] == b["position_ids"][:, i, real[i]].max() + 1 - real.shape[1]
        assert not real[len(recs):].any()  # filler rows


def test_repeat_rows_for_several_samples(demo_dir, encoder):
    recs, b = next(P.prompt_batches(vg_records(demo_dir, 2), encoder, CFG, records.SkipLog(), repeat=2))
    assert len(recs) == 2
    np.testing.assert_array_equal(b["input_ids"][0], b["input_ids"][1])
    np.testing.assert_array_equal(b["pixel_values"][2], b["pixel_values"][3])
    assert not np.array_equal(b["input_ids"][1], b["input_ids"][2])
    with pytest.raises(ValueError, match="multiple of repeat"):
        next(P.prompt_batches(vg_records(demo_dir, 2), encoder, CFG, records.SkipLog(), repeat=3))


def test_bad_items_are_counted(demo_dir, encoder, tmp_path):
    recs = vg_records(demo_dir, 3)
    broken = tmp_path / "ct_broken.png"
    broken.write_bytes(b"not a png")
    recs[1] = records.Record("ct_broken", (str(broken),), recs[1].turns, "ct", "Test_VG.json[1] id=ct_broken", 1)
    tight = P.PromptConfig(batch_size=4, text_buckets=(128,), patch_buckets=(256,),
                           image=ImageConfig(min_pixels=112 * 112, max_pixels=224 * 224))
    log = records.SkipLog()
    out = list(P.prompt_batches(recs, encoder, tight, log))
    assert sum(len(r) for r, _ in out) == 2
    assert log.counts == {"unreadable image": 1}
    assert "Test_VG.json[1] id=ct_broken" in log.report()
    short = P.PromptConfig(batch_size=4, text_buckets=(16,), patch_buckets=(256,), image=tight.image)
    log = records.SkipLog()
    assert list(P.prompt_batches(recs[:1], encoder, short, log)) == []
    assert log.counts == {"prompt longer than the longest text bucket": 1}
