"""On-policy distillation (clinkd_jax.train.on_policy) against an independent path: the student answers the
evaluation prompt builder's prompts (clinkd_jax.infer.prompts: the chat template's generation prompt, positions from
get_rope_index), the answered sequences are rebuilt on the host and read by plain full-logit forwards of student and
teacher, and the loss is the divergence written out in NumPy. The sampled step must give that loss: same prompt,
same pixels, same M-RoPE / MCG-RoPE positions (each model its own gaps), same answers, same masks.

Tolerance: float32 forwards over left- vs right-padded layouts of the same tokens differ by summation order only
(1.2e-7 relative, measured); rtol 1e-5 on the loss. A teacher reading the student's positions instead of its own moves
these tiny random models' loss by 3e-4 relative, and the check is shown to see that."""

import dataclasses
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinkd_jax import sharding
from clinkd_jax.data import demo, pipeline, positions, records, text
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import vocab as vocab_lib
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.infer import prompts as prompts_lib
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models.presets import tiny_qwen
from clinkd_jax.models.qwen2vl import init_params
from clinkd_jax.train import losses, on_policy, steps
from clinkd_jax.train import state as state_lib

STUDENT = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
TEACHER = {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 96,
           "num_hidden_layers": 3}
GAPS, TEACHER_GAPS = (2, 3), (1, 1)  # the student on MCG-RoPE gaps, the teacher on its own (plain Qwen2-VL)
BUCKET = (256, 64)
NEW = 6
SEED, STEP = 7, 5


@dataclasses.dataclass
class World:
    recs: list
    enc: text.ChatEncoder
    image: image_lib.ImageConfig
    student: Qwen2VL
    teacher: Qwen2VL

    def pipeline_config(self, **kw):
        return pipeline.PipelineConfig(batch_size=4, text_buckets=(BUCKET[0],), patch_buckets=(BUCKET[1],),
                                       image=self.image, mrope_gaps=GAPS, teacher_mrope_gaps=TEACHER_GAPS,
                                       image_token_id=self.enc.image_pad_id, pad_token_id=self.enc.pad_id,
                                       shuffle=False, **kw)

    def sampling(self, **kw):
        return gen_lib.SamplingConfig(max_new_tokens=NEW, temperature=1.0, stop_token_ids=self.enc.stop_ids,
                                      pad_token_id=self.enc.pad_id, **kw)


@pytest.fixture(scope="module")
def world():
    """Demo conversations (real images), the real tokenizer on a compact vocabulary, a tiny student and a wider,
    deeper teacher of the same tokens and image processing."""
    d = tempfile.mkdtemp()
    demo.generate(d, train_per_image=1, test_per_image=0, max_side=112)
    recs = records.read_medgrit(f"{d}/train.json", f"{d}/images")
    tok = text.load_tokenizer(text.bundled_qwen2_tokenizer_dir())
    plain = text.ChatEncoder(tok, "qwen2vl")
    ids = vocab_lib.build_ids(tok, {i for r in recs for i in plain.encode(r.turns, [1] * len(r.images)).input_ids})
    enc = text.ChatEncoder(vocab_lib.tokenizer_for(tok, ids), "qwen2vl")
    student_cfg = vocab_lib.compact_config(tiny_qwen(**STUDENT), ids)
    teacher_cfg = vocab_lib.compact_config(tiny_qwen(**TEACHER), ids)
    image = image_lib.for_model(student_cfg, min_pixels=image_lib.ImageConfig.min_pixels, max_pixels=112 * 112)
    return World(recs, enc, image, Qwen2VL(student_cfg), Qwen2VL(teacher_cfg))


def first_exchange(recs):
    return [dataclasses.replace(r, turns=r.turns[:2]) for r in recs]


def batch_of(world, recs, **kw):
    return next(iter(pipeline.make_batches(recs, world.enc, world.pipeline_config(**kw))))


def device(batch):
    out = {k: v for k, v in batch.items() if k not in pipeline.HOST_ONLY}
    return {**out, "record_index": batch["record_index"].astype(np.int32)}


def jsd(log_p, log_q, beta):
    """GKD's generalised JSD in float64, written out: beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1-beta) q."""
    p, q = np.exp(log_p), np.exp(log_q)
    m = beta * p + (1 - beta) * q
    kl = lambda a, log_a: np.sum(a * (log_a - np.log(m)), axis=-1)
    return beta * kl(p, log_p) + (1 - beta) * kl(q, log_q)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def reference_loss(world, recs, batch, student_params, teacher_params, kd):
    """Generate from the evaluation prompt builder's prompts, rebuild each answered sequence on the host, score it
    with full-logit forwards, and reduce as ClinKD's loss groups do (sum over a row pair's tokens, mean over pairs)."""
    rows = [recs[i] if i >= 0 else None for i in batch["record_index"]]
    pcfg = prompts_lib.PromptConfig(batch_size=4, text_buckets=(BUCKET[0],), patch_buckets=(BUCKET[1],),
                                    image=world.image, mrope_gaps=GAPS, image_token_id=world.enc.image_pad_id,
                                    pad_token_id=world.enc.pad_id)
    built = [prompts_lib.build_prompt(r, world.enc, pcfg) for r in rows if r is not None]
    prompt_batch = prompts_lib.collate_prompts(built, BUCKET, pcfg)
    _, draw = on_policy.row_keys(SEED, jnp.int32(STEP), jnp.asarray(batch["record_index"], jnp.int32))
    tokens = np.asarray(gen_lib.generate(student_params, prompt_batch, draw, model=world.student,
                                         sampling=world.sampling()))
    answers = gen_lib.trim(tokens, world.enc.stop_ids)[:len(built)]  # the filler row is no answer
    length = BUCKET[0] + NEW
    per_row = []
    for sample, answer in zip(built, answers):
        ids = np.concatenate([sample["input_ids"], np.asarray(answer, np.int32)])
        grids = np.asarray([g for _, g in sample["images"]]).reshape(-1, 3)
        vision = positions.pack_vision_inputs([sample["images"]], BUCKET[1], world.image.merge_size,
                                              patch_dim=world.image.patch_dim)

        def logp(model, params, gaps):
            pos, _ = positions.get_rope_index(ids[None], grids, image_token_id=world.enc.image_pad_id,
                                              spatial_merge_size=world.image.merge_size, gap_in=gaps[0],
                                              gap_out=gaps[1])
            pad = length - len(ids)
            right = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])  # right-padded to L + n
            out = model.apply({"params": params}, right(ids)[None], right(np.ones_like(ids))[None], right(pos),
                              **vision)["logits"]
            z = np.asarray(out[0, len(sample["input_ids"]) - 1: len(ids) - 1], np.float64)  # predicting the answer
            return log_softmax(z[:, :world.student.cfg.text.vocab_size] / kd.temperature)

        per_row.append(jsd(logp(world.teacher, teacher_params, TEACHER_GAPS),
                           logp(world.student, student_params, GAPS), kd.jsd_beta).sum())
    per_row += [0.0] * (4 - len(per_row))
    pairs = np.asarray(per_row).reshape(-1, 2).sum(axis=1)
    counts = np.asarray([len(a) for a in answers] + [0] * (4 - len(answers))).reshape(-1, 2).sum(axis=1)
    return pairs[counts > 0].mean(), answers


def sampled_loss(world, batch, student_params, teacher_params, kd, teacher_positions="own", by="student"):
    """The metrics of one sampled step (before its update) at step STEP."""
    return step_metrics(world, on_policy.sampled_step, device(batch), student_params, teacher_params, kd,
                        teacher_positions, sampler=on_policy.Sampler(by, world.sampling(), SEED))


def step_metrics(world, fn, batch, student_params, teacher_params, kd, teacher_positions, **kw):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = world.student
    tx = state_lib.optimizer(state_lib.OptimConfig(frozen=()))
    with sharding.use_mesh(mesh):
        state = state_lib.create(student_params, tx).replace(step=jnp.int32(STEP))
        step = jax.jit(functools.partial(fn, teacher=steps.TeacherSource("online", world.teacher, teacher_positions),
                                         model=model, tx=tx, loss=steps.LossSettings(kd=kd, chunk=64), **kw))
        _, metrics = step(state, teacher_params, batch)
    return jax.tree.map(float, metrics)


@pytest.fixture(scope="module")
def params(world):
    return (init_params(world.student, jax.random.key(1)), init_params(world.teacher, jax.random.key(2)))


def test_on_policy_loss_equals_generating_from_the_eval_prompts_and_scoring_on_the_host(world, params):
    """Three conversations and a filler row; teacher on its own M-RoPE ids, student on MCG-RoPE gaps; GKD's JSD."""
    recs = first_exchange(world.recs[:3])
    batch = batch_of(world, recs)
    assert list(batch["record_index"]) == [0, 1, 2, -1] and batch["input_ids"].shape[1] == BUCKET[0]
    kd = losses.KDConfig(divergence="jsd", jsd_beta=0.5, use_ce=False, mask="aligned", reduction="sum", sum_rows=2)
    want, answers = reference_loss(world, recs, batch, *params, kd)
    got = sampled_loss(world, batch, *params, kd)
    assert all(len(a) >= 1 for a in answers)
    assert got["answer_tokens"] == pytest.approx(np.mean([len(a) for a in answers]))
    assert got["loss"] == pytest.approx(want, rel=1e-5) and got["loss"] == got["loss_kd"]  # no CE term
    # the check sees a teacher that reads the student's positions instead of its own
    assert sampled_loss(world, batch, *params, kd, teacher_positions="shared")["loss"] != pytest.approx(want, rel=1e-4)


def test_seq_kd_trains_on_the_teachers_answers_with_clinkds_loss(world, params):
    """kd.seq_kd: the teacher answers the evaluation prompt builder's prompts on its own positions; the step equals
    ClinKD's step (CE + forward KL, released mask) on those conversations written out right-padded on the host."""
    recs = first_exchange(world.recs[:3])
    batch = batch_of(world, recs)
    kd = losses.KDConfig()  # ClinKD's released loss
    got = sampled_loss(world, batch, *params, kd, by="teacher")
    pcfg = prompts_lib.PromptConfig(batch_size=4, text_buckets=(BUCKET[0],), patch_buckets=(BUCKET[1],),
                                    image=world.image, mrope_gaps=TEACHER_GAPS, image_token_id=world.enc.image_pad_id,
                                    pad_token_id=world.enc.pad_id)
    built = [prompts_lib.build_prompt(r, world.enc, pcfg) for r in recs]
    _, draw = on_policy.row_keys(SEED, jnp.int32(STEP), jnp.asarray(batch["record_index"], jnp.int32))
    tokens = gen_lib.generate(params[1], prompts_lib.collate_prompts(built, BUCKET, pcfg), draw, model=world.teacher,
                              sampling=world.sampling())
    length = BUCKET[0] + NEW
    rows = {"input_ids": np.full((4, length), world.enc.pad_id, np.int32),
            "attention_mask": np.zeros((4, length), np.int32), "labels": np.full((4, length), -100, np.int32),
            **{k: np.zeros((3, 4, length), np.int32) for k in ("position_ids", "teacher_position_ids")}}
    for i, (sample, answer) in enumerate(zip(built, gen_lib.trim(np.asarray(tokens), world.enc.stop_ids))):
        ids = np.concatenate([sample["input_ids"], np.asarray(answer, np.int32)])
        rows["input_ids"][i, :len(ids)], rows["attention_mask"][i, :len(ids)] = ids, 1
        rows["labels"][i, len(sample["input_ids"]):len(ids)] = answer
        grids = np.asarray([g for _, g in sample["images"]]).reshape(-1, 3)
        for key, gaps in (("position_ids", GAPS), ("teacher_position_ids", TEACHER_GAPS)):
            rows[key][:, i, :len(ids)] = positions.get_rope_index(
                ids[None], grids, image_token_id=world.enc.image_pad_id, spatial_merge_size=world.image.merge_size,
                gap_in=gaps[0], gap_out=gaps[1])[0][:, 0]
    rows.update({k: batch[k] for k in gen_lib.VISION_KEYS})
    want = step_metrics(world, steps.train_step, rows, *params, kd, "own")
    assert got["loss_ce"] > 0 and got["loss_kd"] > 0 and got["answer_tokens"] >= 1
    for key in ("loss", "loss_ce", "loss_kd"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_the_prompt_is_the_conversation_up_to_a_drawn_answer(world):
    """Multi-exchange rows: a prompt ends right before one of the row's answers, with the row's own tokens and
    positions, left-padded; over many draws every answer of every row is asked for."""
    batch = batch_of(world, world.recs[:4])
    supervised = batch["labels"] != losses.IGNORE
    starts = [set(np.flatnonzero(s & ~np.concatenate([[False], s[:-1]])).tolist()) for s in supervised]
    assert min(len(s) for s in starts) >= 2  # the demo's conversations hold several exchanges
    seen = [set() for _ in starts]
    for k in range(40):
        keys = jax.random.split(jax.random.key(k), 4)
        p = jax.tree.map(np.asarray, on_policy.prompts(batch, world.enc.pad_id, keys))
        for i, row_starts in enumerate(starts):
            n = int(p["attention_mask"][i].sum())
            assert n in row_starts and p["attention_mask"][i, -n:].all()  # left-padded, ends at an answer
            np.testing.assert_array_equal(p["input_ids"][i, -n:], batch["input_ids"][i, :n])
            for key in on_policy.POSITION_KEYS:
                np.testing.assert_array_equal(p[key][:, i, -n:], batch[key][:, i, :n])
            seen[i].add(n)
            assert world.enc.tok.decode(p["input_ids"][i, -n:].tolist()).endswith("<|im_start|>assistant\n")
    assert seen == starts
    for key in gen_lib.VISION_KEYS:
        np.testing.assert_array_equal(p[key], batch[key])


def test_answered_rows_mask_after_the_stop_and_continue_each_models_positions(world):
    """Fabricated answers: one stops at its 3rd token, one never stops, one samples an image token (the answer ends
    before it), a filler row; positions of the answer equal get_rope_index over the whole answered conversation."""
    recs = first_exchange(world.recs[:3])
    batch = batch_of(world, recs)
    keys = jax.random.split(jax.random.key(0), 4)
    prompt = on_policy.prompts(batch, world.enc.pad_id, keys)
    im_end, img = world.enc.stop_ids[0], world.enc.image_pad_id
    tokens = np.asarray([[11, 12, im_end, 13, 14, 15], [21, 22, 23, 24, 25, 26], [31, 32, img, 33, 34, 35],
                         [41, 42, 43, 44, 45, 46]], np.int32)
    rows = jax.tree.map(np.asarray, on_policy.answered(prompt, jnp.asarray(tokens), world.sampling(), img))
    length = BUCKET[0]
    want = [[11, 12, im_end], [21, 22, 23, 24, 25, 26], [31, 32], []]
    for i, answer in enumerate(want):
        n = len(answer)
        np.testing.assert_array_equal(rows["labels"][i, length:length + n], answer)
        assert (rows["labels"][i, length + n:] == losses.IGNORE).all() and (rows["labels"][i, :length] == -100).all()
        assert rows["attention_mask"][i, length:].tolist() == [1] * n + [0] * (NEW - n)
        assert (rows["input_ids"][i, length + n:] == world.enc.pad_id).all()
        if i == 3:
            assert not rows["attention_mask"][i].any()  # the filler row stays empty
            continue
        real = rows["attention_mask"][i].astype(bool)
        ids = rows["input_ids"][i][real]
        grid = np.asarray([[1, *(batch["vision_position_ids"][i].max(axis=0) + 1)]])  # (t, h, w) of its one image
        for key, gaps in (("position_ids", GAPS), ("teacher_position_ids", TEACHER_GAPS)):
            pos, _ = positions.get_rope_index(ids[None], grid, image_token_id=img,
                                              spatial_merge_size=world.image.merge_size, gap_in=gaps[0],
                                              gap_out=gaps[1])
            np.testing.assert_array_equal(rows[key][:, i][:, real], pos[:, 0])


def test_a_sample_depends_on_seed_step_and_record_not_on_the_batch_or_the_mesh(world, params):
    """The same records in another order, beside other rows, and sharded over 4 devices: each record's answer is
    the same; another step or seed gives other answers."""
    student_params = params[0]
    recs = first_exchange(world.recs[:8])

    def answers(order, step=STEP, seed=SEED, mesh=None):
        weights = student_params
        batch = batch_of(world, [recs[i] for i in order])
        assert batch["record_index"][:len(order)].tolist() == list(range(len(order)))
        index = jnp.asarray([order[i] if i < len(order) else -1 for i in range(4)], jnp.int32)
        choose, draw = on_policy.row_keys(seed, jnp.int32(step), index)
        prompt = on_policy.prompts(batch, world.enc.pad_id, choose)
        fn = jax.jit(functools.partial(gen_lib.generate, model=world.student, sampling=world.sampling()))
        inputs = on_policy.generation_batch(prompt, "position_ids")
        if mesh is not None:
            inputs = sharding.place_batch(jax.tree.map(np.asarray, inputs), mesh, sharding.DEFAULT_RULES)
            draw = jax.device_put(draw, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
            weights = jax.device_put(weights, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        with sharding.use_mesh(mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])):
            tokens = np.asarray(fn(weights, inputs, draw))
        return {order[i]: tuple(tokens[i]) for i in range(len(order))}

    base = answers([0, 1, 2, 3])
    assert answers([3, 1, 0, 2]) == base
    assert {k: v for k, v in answers([2, 5, 0, 7]).items() if k in base} == {k: base[k] for k in (0, 2)}
    assert answers([0, 1, 2, 3], mesh=sharding.make_mesh((4, 1, 1), devices=jax.devices()[:4])) == base
    assert answers([0, 1, 2, 3], step=STEP + 1) != base and answers([0, 1, 2, 3], seed=SEED + 1) != base


def test_on_policy_steps_are_drawn_from_seed_and_step():
    draws = [on_policy.drawn(0, s, 0.3) for s in range(4000)]
    assert abs(np.mean(draws) - 0.3) < 3 * np.sqrt(0.3 * 0.7 / 4000)
    assert draws == [on_policy.drawn(0, s, 0.3) for s in range(4000)]  # the same on every host, after a resume
    assert draws != [on_policy.drawn(1, s, 0.3) for s in range(4000)]
    assert not any(on_policy.drawn(0, s, 0.0) for s in range(100)) and all(on_policy.drawn(0, s, 1.0)
                                                                          for s in range(100))
