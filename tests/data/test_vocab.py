"""Compact vocabulary: exact round trips through the real Qwen2 tokenizer, the compact model equal to
the full model restricted to the kept rows, ids carried by checkpoints, mismatches refused."""

import json

import jax
import numpy as np
import pytest

from clinkd_jax.data import pipeline, records, text, vocab
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.models import config as mcfg
from clinkd_jax.models.presets import tiny_qwen
from clinkd_jax.models.qwen2vl import Qwen2VL, init_params


@pytest.fixture(scope="module")
def demo_recs(demo_dir):
    return records.read_medgrit(f"{demo_dir}/train.json", f"{demo_dir}/images")


@pytest.fixture(scope="module")
def ids(encoder, demo_recs):
    used = {int(i) for r in demo_recs for i in encoder.encode(r.turns, [1] * len(r.images)).input_ids}
    return vocab.build_ids(encoder.tok, used)


def test_kept_ids(encoder, ids):
    tok = encoder.tok
    assert list(ids) == sorted(set(ids)) and len(ids) % 128 == 0
    assert set(range(256)) <= set(ids)  # every byte: any text stays encodable
    assert set(tok.added_tokens_decoder) <= set(ids)
    assert len(ids) < 2000  # the demo uses a few hundred of the 151,669 ids


@pytest.mark.parametrize("text_", ["Where is the <|object_ref_start|>dark round cyst<|object_ref_end|>?",
                                   "Pneumothorax, 气胸 — ünseen words\n(12,345)"])
def test_round_trip(encoder, ids, text_):
    """Kept tokens map one to one; unseen ones are spelled in bytes; decoding gives the text back."""
    full, compact = encoder.tok, vocab.CompactTokenizer(encoder.tok, ids)
    rows = compact(text_, add_special_tokens=False)["input_ids"]
    assert max(rows) < len(ids)
    assert compact.decode(rows) == text_
    orig = full(text_, add_special_tokens=False)["input_ids"]
    if set(orig) <= set(ids):
        assert [ids[r] for r in rows] == orig
    else:
        assert len(rows) > len(orig)
    with pytest.raises(ValueError, match="outside the compact vocabulary"):
        compact.decode([len(ids)])


def test_chat_encoder_rows_are_the_full_ids(encoder, ids, demo_recs):
    enc = text.ChatEncoder(vocab.CompactTokenizer(encoder.tok, ids), "qwen2vl")
    assert ids[enc.image_pad_id] == encoder.image_pad_id and ids[enc.pad_id] == encoder.pad_id
    assert [ids[i] for i in enc.stop_ids] == list(encoder.stop_ids)
    for r in demo_recs[:6]:
        a, b = encoder.encode(r.turns, [4]), enc.encode(r.turns, [4])
        np.testing.assert_array_equal(np.asarray(ids)[b.input_ids], a.input_ids)
        np.testing.assert_array_equal(np.where(b.labels < 0, -100, np.asarray(ids)[np.maximum(b.labels, 0)]), a.labels)


def test_compact_model_is_the_full_model_restricted(encoder, ids, demo_recs):
    """Row-sliced embedding and LM head: logits == the full model's logits at the kept ids (float32, same
    matmul rows; rtol 1e-5 allows a different summation order in XLA's dot over a smaller output)."""
    full_cfg = tiny_qwen()
    cfg = vocab.compact_config(full_cfg, ids)
    assert cfg.text.vocab_size == len(ids) and ids[cfg.image_token_id] == full_cfg.image_token_id
    full_params = init_params(Qwen2VL(full_cfg), jax.random.key(0))
    params = jax.tree.map(lambda x: x, full_params)
    params["model"]["embed_tokens"]["embedding"] = full_params["model"]["embed_tokens"]["embedding"][np.asarray(ids)]
    params["lm_head"]["kernel"] = full_params["lm_head"]["kernel"][:, np.asarray(ids)]

    def batch(enc, image_id):
        pcfg = pipeline.PipelineConfig(batch_size=2, text_buckets=(192,), patch_buckets=(256,), shuffle=False,
                                       image=ImageConfig(max_pixels=112 * 112), num_epochs=1,
                                       image_token_id=image_id, pad_token_id=enc.pad_id)
        b = next(iter(pipeline.make_batches(demo_recs[:2], enc, pcfg)))
        keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "vision_position_ids",
                "vision_segment_ids")
        return {k: b[k] for k in keys}

    compact_enc = text.ChatEncoder(vocab.CompactTokenizer(encoder.tok, ids), "qwen2vl")
    a = Qwen2VL(full_cfg).apply({"params": full_params}, **batch(encoder, full_cfg.image_token_id))["logits"]
    b = Qwen2VL(cfg).apply({"params": params}, **batch(compact_enc, cfg.image_token_id))["logits"]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a)[..., np.asarray(ids)], rtol=1e-5, atol=1e-6)


def test_ids_travel_with_the_config(ids):
    cfg = vocab.compact_config(tiny_qwen(), ids)
    back = mcfg.Qwen2VLConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back == cfg and back.vocab_ids == tuple(ids)
    assert "clinkd_vocab_ids" not in tiny_qwen().to_hf_dict()
    with pytest.raises(mcfg.ConfigError, match="vocab_ids has"):
        cfg.replace(vocab_ids=tuple(ids)[:-1])


def test_mismatches_are_refused(ids, tmp_path):
    from clinkd_jax import hf_checkpoint
    from clinkd_jax.model_source import same_inputs

    cfg = vocab.compact_config(tiny_qwen(), ids)
    with pytest.raises(ValueError, match="the teacher has the full vocabulary but the model has a compact"):
        same_inputs(cfg, tiny_qwen(), "the teacher")
    with pytest.raises(mcfg.ConfigError, match="cannot be exported"):
        hf_checkpoint.save_hf_checkpoint({}, cfg, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="duplicate"):
        vocab.CompactTokenizer(None, [1, 1])


def test_data_vocab_of_an_eval_only_config(demo_dir, encoder, tmp_path):
    """`compact_vocab = "data"` with no training files (an evaluation config): the test files alone."""
    import os
    import sys

    from clinkd_jax.stage import compact_vocab

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from configs import base

    c = base.get_config()
    c.stage, c.model.preset, c.model.compact_vocab = "eval", "tiny_qwen", "data"
    c.eval.data_dir, c.eval.image_dir = str(demo_dir), str(demo_dir / "images")
    ids = compact_vocab(c, str(tmp_path))
    test = records.read_medgrit(str(demo_dir / "Test_GC.json"), str(demo_dir / "images"))
    used = {int(i) for r in test for i in encoder.encode(r.turns, [1]).input_ids}
    assert used <= set(ids) and json.load(open(tmp_path / "vocab_ids.json")) == list(ids)
    c.model.compact_vocab = ""
    assert compact_vocab(c, str(tmp_path)) is None
