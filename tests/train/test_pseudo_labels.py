"""Offline pseudo-labels: with k = the whole vocabulary, training from the store equals the online
distillation step (same loss terms, same parameters after two steps); the store's meta data guards
against a training run with other settings."""


import jax
import numpy as np
import pytest
from test_steps import DROP, feed, on_one_device, one_device_step, with_padding_rows

from clinkd_jax.data import pipeline
from clinkd_jax.data import pseudo_labels as store
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models.qwen2vl import init_params
from clinkd_jax.train import losses, pseudo_labels, steps
from clinkd_jax.train import state as state_lib

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_cached_full_vocab_equals_online(tmp_path, batches_of_family, family, mask="released"):
    """qwen2_5_vl: a Qwen2.5-VL pair whose teacher has 64 padding rows more (7B vs 3B); the store holds the
    teacher's distribution over the student's vocabulary, as the online step cuts it. qwen3_vl: DeepStack and the
    Qwen3 LLM on both sides."""
    cfg, batches = batches_of_family(family)
    batches = batches[:2]
    teacher, student = Qwen2VL(cfg), Qwen2VL(cfg)
    t_params = init_params(teacher, jax.random.key(10))
    s_params = init_params(student, jax.random.key(11))
    if family == "qwen2_5_vl":
        teacher, t_params = with_padding_rows(cfg, t_params)
    kd = losses.KDConfig(mask=mask)
    path = str(tmp_path / "pl")
    topk = jax.jit(pseudo_labels.teacher_topk_fn(teacher, top_k=cfg.text.vocab_size, temperature=kd.temperature,
                                                 vocab=cfg.text.vocab_size, chunk=64))
    n = pseudo_labels.write(path, batches, topk, t_params, mask=mask, meta={"temperature": kd.temperature}, place=feed)
    assert n == sum(int(b["sample_mask"].sum()) for b in batches)
    reader = store.PseudoLabelReader(path)
    assert reader.meta["mask"] == mask and reader.meta["shards"] == 1 and reader.meta["entries"] == n
    # re-attach the cached entries to the same batches, as the pipeline does for a pseudo-label run
    cached = []
    for b in batches:
        b = dict(b)
        length, k = b["input_ids"].shape[1], cfg.text.vocab_size
        ids = np.zeros((len(b["record_index"]), length, k), np.int32)
        logp = np.zeros(ids.shape, np.float32)
        valid = np.zeros((len(b["record_index"]), length), bool)
        for i, r in enumerate(b["record_index"]):
            if r >= 0:
                e = reader.get(r)
                ids[i, e["positions"]], logp[i, e["positions"]], valid[i, e["positions"]] = e["ids"], e["logp"], True
        b.update(teacher_topk_ids=ids, teacher_topk_logp=logp, teacher_topk_valid=valid)
        cached.append(b)

    tx = state_lib.optimizer(state_lib.OptimConfig(learning_rate=1e-3, total_steps=4))
    loss = steps.LossSettings(kd=kd, chunk=64)
    online = one_device_step(model=student, tx=tx, loss=loss, teacher=steps.TeacherSource("online", teacher))
    offline = one_device_step(model=student, tx=tx, loss=loss, teacher=steps.TeacherSource("cached"))
    a = b_ = on_one_device(state_lib.create(s_params, tx))
    for on_batch, off_batch in zip(batches, cached):
        a, ma = online(a, t_params, feed(on_batch))
        b_, mb = offline(b_, None, {k: v for k, v in off_batch.items() if k not in DROP})
        # float32; the cached path sums the same terms in another order (top-k sorted by probability)
        np.testing.assert_allclose([mb["loss_kd"], mb["loss_ce"]], [ma["loss_kd"], ma["loss_ce"]], rtol=2e-5)
    # after two AdamW steps of lr 1e-3 (each moves a weight by up to ~1e-3): agreement to 1e-4; Adam's
    # normalisation turns float32 noise in near-zero gradients into ~2e-5 differences, a wrong KD
    # gradient into ~1e-3 ones
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b_.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4, rtol=0)


def test_pipeline_attaches_cached_labels(tmp_path):
    """A pseudo-label run's batches carry teacher_topk_* at exactly the cached positions."""
    from clinkd_jax.data import demo, records, text
    from clinkd_jax.data.image import ImageConfig

    d = tmp_path / "demo"
    demo.generate(str(d), train_per_image=1, test_per_image=0, max_side=112)
    recs = records.read_medgrit(str(d / "train.json"), str(d / "images"))
    enc = text.ChatEncoder(text.load_tokenizer(text.bundled_qwen2_tokenizer_dir()), "qwen2vl")
    base = dict(batch_size=4, text_buckets=(160,), patch_buckets=(64,), image=ImageConfig(max_pixels=112 * 112),
                shuffle=False)
    plain = list(pipeline.make_batches(recs, enc, pipeline.PipelineConfig(**base)))
    path = str(tmp_path / "pl")
    fake_topk = lambda params, b: (np.tile(np.arange(3, dtype=np.int32), (*b["input_ids"].shape, 1)),
                                   np.full((*b["input_ids"].shape, 3), -1.0, np.float32))
    pseudo_labels.write(path, plain, fake_topk, None, mask="released", meta={})
    out = list(pipeline.make_batches(recs, enc, pipeline.PipelineConfig(**base, pseudo_labels=path)))
    for p, b in zip(plain, out):
        want = (p["labels"] != -100) & (p["attention_mask"] == 1)
        np.testing.assert_array_equal(b["teacher_topk_valid"], want)
        assert b["teacher_topk_ids"].shape == (*p["input_ids"].shape, 3) and (b["teacher_topk_logp"][want] == -1).all()
    # a store holding NaN (a teacher run gone bad) for some records: each is a counted skip, or under strict a
    # DataError naming the record; never a NaN loss
    bad = lambda b: (b["record_index"] % 3 == 0)[:, None, None]  # noqa: E731
    nan_topk = lambda params, b: (fake_topk(params, b)[0], np.where(bad(b), np.nan, fake_topk(params, b)[1]))  # noqa
    pseudo_labels.write(str(tmp_path / "nan"), plain, nan_topk, None, mask="released", meta={})
    log = records.SkipLog()
    out = list(pipeline.make_batches(recs, enc, pipeline.PipelineConfig(**base, pseudo_labels=str(tmp_path / "nan")),
                                     log))
    assert log.counts["non-finite pseudo-labels"] == sum(i % 3 == 0 for i in range(len(recs))) > 0
    assert all(np.isfinite(b["teacher_topk_logp"]).all() for b in out)
    with pytest.raises(records.DataError, match="non-finite pseudo-labels"):
        list(pipeline.make_batches(recs, enc, pipeline.PipelineConfig(**base, pseudo_labels=str(tmp_path / "nan"),
                                                                      strict=True)))


def test_a_run_refuses_a_store_it_cannot_use(tmp_path):
    """The store records the mask and temperature it was written with; a KD run with other settings, the
    reverse KL (needs the whole distribution) or the teacher on its own positions is refused by name."""
    from test_loop import small_config

    from clinkd_jax.train.config import ConfigError, pseudo_label_switches, validate

    path = tmp_path / "pl"
    path.mkdir()
    store.write_index(str(path), [[0, 1], [2]], {"mask": "released", "temperature": 0.5})
    assert np.load(path / store.INDEX).tolist() == [[0, 0, 0], [1, 0, 1], [2, 1, 0]]  # record, shard, position
    def kd_run(**changes):
        c = small_config(**changes)
        c.stage = "kd"
        return c

    validate(kd_run(**{"kd.pseudo_labels": str(path)}))
    for field, value, message in (("mask", "aligned", "kd.mask='aligned' but the pseudo-labels .* kd.mask='released'"),
                                  ("temperature", 2.0, "kd.temperature=2.0 but .* kd.temperature=0.5")):
        bad = kd_run(**{"kd.pseudo_labels": str(path), f"kd.{field}": value})
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    for divergence in ("reverse_kl", "jsd"):  # on the top k and a tail bucket
        validate(kd_run(**{"kd.pseudo_labels": str(path), "kd.divergence": divergence}))
    own = kd_run(**{"teacher.positions": "own"})
    with pytest.raises(ConfigError, match="teacher.positions='own': pseudo-labels are computed with the student's"):
        pseudo_label_switches(own)  # what the writer checks first
    with pytest.raises(ConfigError, match="not a pseudo-label store"):
        validate(kd_run(**{"kd.pseudo_labels": str(tmp_path)}))
