"""Demo batches in a tiny model's vocabulary, shared by the training tests."""

import functools

import numpy as np
import pytest

from clinkd_jax.data import demo, pipeline, records, text
from clinkd_jax.data.image import ImageConfig, for_model
from clinkd_jax.models import config as mcfg
from clinkd_jax.models.presets import tiny as tiny_config

TINY_VOCAB = 1024


@functools.lru_cache(maxsize=None)
def demo_batches(batch_size=4, num_epochs=1, seed=0, text_buckets=(160,), patch_buckets=(64,), pack=False,
                 family="qwen2_vl"):
    """Demo-set batches whose token ids are compacted into a 1024-token vocabulary (the real Qwen2
    tokenizer's ids go up to 151k; a tiny test model with that vocabulary would dominate test time). The
    images are processed as the tiny model of `family` expects them (Qwen3-VL: 16 px patches)."""
    import tempfile

    d = tempfile.mkdtemp()
    demo.generate(d, train_per_image=4, test_per_image=0, max_side=112)
    recs = records.read_medgrit(f"{d}/train.json", f"{d}/images")
    enc = text.ChatEncoder(text.load_tokenizer(text.bundled_qwen2_tokenizer_dir()), "qwen2vl")
    tiny = mcfg.as_family(tiny_config(vocab_size=TINY_VOCAB), family)
    image = for_model(tiny, min_pixels=ImageConfig.min_pixels, max_pixels=112 * 112)
    cfg = pipeline.PipelineConfig(batch_size=batch_size, text_buckets=text_buckets, patch_buckets=patch_buckets,
                                  image=image, num_epochs=num_epochs, seed=seed, pack=pack)
    batches = list(pipeline.make_batches(recs, enc, cfg))
    used = np.unique(np.concatenate([b["input_ids"].ravel() for b in batches]))
    free = [i for i in range(TINY_VOCAB) if i not in range(250, 256)]
    table = {int(t): free[k] for k, t in enumerate(u for u in used if u != cfg.image_token_id)}
    table[cfg.image_token_id] = tiny.image_token_id
    assert len(table) <= TINY_VOCAB - 6
    lookup = np.vectorize(lambda t: table.get(int(t), t))
    out = []
    for b in batches:
        b = dict(b)
        b["input_ids"] = lookup(b["input_ids"]).astype(np.int32)
        b["labels"] = np.where(b["labels"] == -100, -100, lookup(b["labels"])).astype(np.int32)
        out.append(b)
    return tiny, out


@pytest.fixture(scope="session")
def tiny_and_batches():
    return demo_batches()


@pytest.fixture(scope="session")
def batches_of_family():
    """demo_batches(family=...) for tests parametrized over the model families."""
    return lambda family: demo_batches(family=family)


@pytest.fixture(scope="session")
def plain_and_packed():
    """The 32 demo conversations in one batch twice: one per row, and packed several per row."""
    room = dict(batch_size=32, text_buckets=(512,), patch_buckets=(256,))
    tiny, plain = demo_batches(**room)
    return tiny, plain, demo_batches(**room, pack=True)[1]
