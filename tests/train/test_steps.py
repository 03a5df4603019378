"""SFT and distillation steps: they learn on the demo data, freeze what they should, and give the same
result on a 2x2x2 mesh of 8 fake devices as on one device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clinkd_jax import sharding
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models.config import as_family
from clinkd_jax.models.qwen2vl import abstract_params, init_params
from clinkd_jax.train import losses, steps
from clinkd_jax.train import state as state_lib

OPT = state_lib.OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=40, grad_clip=1.0)
DROP = ("index", "sample_mask", "decode_offsets", "record_index")


def feed(batch):
    return {k: v for k, v in batch.items() if k not in DROP}


def one_device_step(**kw):
    """train_step jitted with the state on one device in and out: an uncommitted state going in and a
    committed one coming out would compile the step a second time on its second call."""
    return jax.jit(functools.partial(steps.train_step, **kw), out_shardings=(_one_device(), None))


def on_one_device(tree):
    return jax.device_put(tree, _one_device())


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def run(model, params, batches, n, teacher=None, teacher_params=None, kd=None, opt=OPT, mesh=None):
    mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = state_lib.optimizer(opt)
    st_sh = state_lib.state_shardings(abstract_params(model), tx, mesh)
    t_sh = None if teacher is None else sharding.tree_shardings(
        abstract_params(teacher), mesh)
    with sharding.use_mesh(mesh):
        st = jax.jit(functools.partial(state_lib.create, tx=tx), out_shardings=st_sh)(params)
        source = None if kd is None else steps.TeacherSource("cached") if teacher is None else steps.TeacherSource(
            "online", teacher)
        step = steps.jit_train_step(st_sh, t_sh, None, model=model, tx=tx, loss=steps.LossSettings(kd=kd, chunk=64),
                                    teacher=source, frozen=opt.frozen)
        history = []
        for i in range(n):
            st, m = step(st, teacher_params, feed(batches[i % len(batches)]))
            history.append(jax.tree.map(float, m))
    return st, history


@pytest.fixture(scope="module")
def sft_run(tiny_and_batches):
    cfg, batches = tiny_and_batches
    model = Qwen2VL(cfg)
    params = init_params(model, jax.random.key(0))
    return model, params, run(model, params, batches, 30)


def test_sft_lowers_the_loss_and_keeps_the_vision_tower_frozen(sft_run):
    model, params, (st, hist) = sft_run
    first, last = hist[0]["loss"], np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.6 * first, (first, last)
    for path in (("visual", "blocks", "attn", "qkv", "kernel"), ("visual", "merger", "mlp_0", "kernel")):
        a, b = params, st.params
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen: bit-identical
    assert not np.array_equal(np.asarray(params["model"]["norm"]["scale"]),
                              np.asarray(st.params["model"]["norm"]["scale"]))
    assert "loss_kd" not in hist[0] and hist[0]["tokens"] > 0


def test_frozen_parts_have_no_optimizer_state(sft_run):
    _, _, (st, _) = sft_run
    leaves = jax.tree_util.tree_leaves_with_path(st.opt_state)
    assert not any("visual" in state_lib.path_str(p) for p, _ in leaves)
    assert any("layers" in state_lib.path_str(p) for p, _ in leaves)


def test_distillation_lowers_the_kd_loss(tiny_and_batches, sft_run):
    """The SFT-trained model teaches a fresh student (same geometry, other init): L_KD falls."""
    cfg, batches = tiny_and_batches
    teacher_model, _, (teacher_state, _) = sft_run
    student = Qwen2VL(cfg)
    params = init_params(student, jax.random.key(1))
    kd = losses.KDConfig()
    _, hist = run(student, params, batches, 20, teacher=teacher_model, teacher_params=teacher_state.params, kd=kd)
    assert hist[-1]["loss_kd"] < 0.7 * hist[0]["loss_kd"]
    h = hist[0]
    np.testing.assert_allclose(h["loss"], (0.5 * h["loss_kd"] + h["loss_ce"]) / 1.5, rtol=1e-5)


def test_eight_devices_equal_one(tiny_and_batches):
    """3 steps on a (2, 2, 2) mesh vs one device. Tolerance: losses 1e-5 relative, params 1e-4 absolute
    after 3 AdamW updates of size ~lr=3e-3 (sharded reductions reorder float32 sums; Adam's
    normalisation amplifies noise only where gradients are ~0)."""
    cfg, batches = tiny_and_batches
    model = Qwen2VL(cfg)
    params = init_params(model, jax.random.key(2))
    one, h1 = run(model, params, batches, 3)
    mesh = sharding.make_mesh((2, 2, 2))
    params8 = jax.device_put(params, sharding.tree_shardings(
        abstract_params(model), mesh))
    eight, h8 = run(model, params8, batches, 3, mesh=mesh)
    q = eight.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec[1] == "fsdp"
    np.testing.assert_allclose([h["loss"] for h in h8], [h["loss"] for h in h1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_bfloat16_first_moment(tiny_and_batches):
    """optim.mu_dtype="bfloat16": AdamW's first moment is stored in bfloat16 (the second stays float32), and
    3 steps land within 1e-4 of the float32 run: bfloat16 rounds mu by <= 2^-9 relative, so each update of
    size <= lr = 3e-3 moves by <= ~1e-5 (x3 steps, plus the drift of slightly different gradients)."""
    cfg, batches = tiny_and_batches
    model = Qwen2VL(cfg)
    params = init_params(model, jax.random.key(4))
    f32, _ = run(model, params, batches, 3)
    bf16, _ = run(model, params, batches, 3, opt=dataclasses.replace(OPT, mu_dtype="bfloat16"))
    leaves = [(state_lib.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(bf16.opt_state)]
    mus, nus = ([x for p, x in leaves if name in p] for name in (".mu", ".nu"))
    assert mus and {m.dtype for m in mus} == {jnp.dtype("bfloat16")}
    assert nus and {n.dtype for n in nus} == {jnp.dtype("float32")}
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(bf16.params), jax.tree.leaves(f32.params))]
    assert 0 < max(diffs) < 1e-4, max(diffs)


@pytest.mark.parametrize("kd", [None, losses.KDConfig(sum_rows=0)])
def test_packed_rows_give_the_loss_of_unpacked_ones(plain_and_packed, kd):
    """data.pack: the 32 demo conversations in one batch of packed rows (several per row, attention and positions
    kept apart) give the loss and gradient of the same conversations one per row: the SFT CE mean and, with
    kd.sum_rows=0, the KD loss (teacher: another random model). Tolerance: float32 sums in another order
    (rtol 2e-5 on the loss, atol 1e-6 on gradients of size ~1e-2)."""
    cfg, plain, packed = plain_and_packed
    assert len(plain) == len(packed) == 1 and packed[0]["attention_mask"].max() >= 3
    model = Qwen2VL(cfg)
    params, t_params = init_params(model, jax.random.key(5)), init_params(model, jax.random.key(6))

    def loss(p, batch):
        batch = feed(batch)
        hidden, head = steps.hidden_and_head(model, p, batch)
        teacher = steps.TeacherSource("online", model).signal(t_params, batch) if kd else None
        return losses.chunked_loss(hidden, head, batch["labels"], kd=kd, chunk=64, teacher=teacher)["loss"]

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss))(params, x[0]) for x in (plain, packed))
    np.testing.assert_allclose(float(b), float(a), rtol=2e-5)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-4)


def test_gradient_accumulation_averages_micro_batches(tiny_and_batches):
    """grad_accum=2 over micro-batches A, B == one update with (grad A + grad B) / 2; the first micro-step
    leaves the parameters untouched."""
    cfg, batches = tiny_and_batches
    model = Qwen2VL(cfg)
    params = init_params(model, jax.random.key(3))
    a, b = feed(batches[0]), feed(batches[1])
    acc_opt = state_lib.OptimConfig(learning_rate=1e-3, grad_accum=2, total_steps=10)
    one_opt = state_lib.OptimConfig(learning_rate=1e-3, grad_accum=1, total_steps=10)
    tx2, tx1 = state_lib.optimizer(acc_opt), state_lib.optimizer(one_opt)
    step2 = one_device_step(model=model, tx=tx2, loss=steps.LossSettings(chunk=64), frozen=acc_opt.frozen)
    st = on_one_device(state_lib.create(params, tx2))
    st, _ = step2(st, None, a)
    for x, y in zip(jax.tree.leaves(st.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    st, _ = step2(st, None, b)

    def loss(p, batch):
        hidden, head = steps.hidden_and_head(model, p, batch)
        return losses.chunked_loss(hidden, head, batch["labels"], chunk=64)["loss"]

    grad = jax.jit(jax.grad(loss))
    ga, gb = grad(params, a), grad(params, b)
    mean = jax.tree.map(lambda x, y: (x + y) / 2, ga, gb)
    upd, _ = tx1.update(mean, tx1.init(params), params)
    manual = jax.tree.map(lambda p, u: p + u, params, upd)
    # one AdamW step of lr 1e-3 moves a weight by up to ~1e-3; agreement to 1e-5 (1% of a step) leaves room
    # only for float32 noise that Adam's normalisation magnifies where a gradient is ~0
    for x, y in zip(jax.tree.leaves(st.params), jax.tree.leaves(manual)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches], axis=sharding.BATCH_AXIS.get(k, 0)) for k in batches[0]}


def test_kd_loss_is_the_released_per_device_loss_on_any_mesh(tiny_and_batches):
    """The released trainer: L on each device's micro-batch of 2 rows (KL summed over it, CE its mean), DDP
    averaging the devices. Here: 16 rows on 8 devices (2 per device), `kd.sum_rows=2`, loss and gradient
    equal the mean of 8 single-device losses on those micro-batches, and do not change on 1 device.
    `sum_rows=0` (one sum over the batch) makes L_KD 8x larger: it grows with the data-parallel width.
    Tolerance 1e-5 relative: float32 sums in another order."""
    cfg, batches = tiny_and_batches
    student, teacher = Qwen2VL(cfg), Qwen2VL(cfg)
    s_params, t_params = init_params(student, jax.random.key(4)), init_params(teacher, jax.random.key(5))
    batch = feed(_concat(batches[:4]))
    assert batch["input_ids"].shape[0] == 16

    def loss_fn(kd, grad=True):
        def f(params, t_params, batch):
            hidden, head = steps.hidden_and_head(student, params, batch)
            signal = steps.TeacherSource("online", teacher).signal(t_params, batch)
            out = losses.chunked_loss(hidden, head, batch["labels"], kd=kd, chunk=64, teacher=signal)
            return out["loss"], out
        return jax.jit(jax.value_and_grad(f, has_aux=True) if grad else lambda *a: (f(*a), None))

    released = losses.KDConfig(sum_rows=2)
    mesh = sharding.make_mesh((1, 8, 1))
    with sharding.use_mesh(mesh):
        on_mesh = sharding.tree_shardings(abstract_params(student), mesh)
        placed = sharding.place_batch(batch, mesh, sharding.DEFAULT_RULES)
        assert placed["input_ids"].sharding.shard_shape((16, 1))[0] == 2  # 2 rows per device
        (l8, out8), g8 = loss_fn(released)(jax.device_put(s_params, on_mesh), jax.device_put(t_params, on_mesh), placed)
    one_device = loss_fn(losses.KDConfig(sum_rows=0))  # compiled once for the 8 micro-batches
    micro = [one_device(s_params, t_params, {k: np.take(v, range(2 * i, 2 * i + 2), axis=sharding.BATCH_AXIS.get(k, 0))
                                             for k, v in batch.items()}) for i in range(8)]
    ddp_loss = np.mean([float(m[0][0]) for m in micro])
    ddp_grad = jax.tree.map(lambda *g: np.mean(np.stack([np.asarray(x) for x in g]), axis=0), *[m[1] for m in micro])
    np.testing.assert_allclose(float(l8), ddp_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(ddp_grad)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-7)
    (l1, _), _ = loss_fn(released, grad=False)(s_params, t_params, batch)
    np.testing.assert_allclose(float(l1), float(l8), rtol=1e-5)
    (_, whole), _ = loss_fn(losses.KDConfig(sum_rows=0), grad=False)(s_params, t_params, batch)
    np.testing.assert_allclose(float(whole["loss_kd"]), 8 * float(out8["loss_kd"]), rtol=1e-5)


@pytest.mark.parametrize("norm", [0.5, 5.0])
def test_clip_by_global_norm_scales_every_gradient_by_one_factor(norm):
    """`state_lib.clip_by_global_norm` against torch.nn.utils.clip_grad_norm_'s formula (float64 NumPy:
    g * min(1, max / (|g| + 1e-6))) and optax.clip_by_global_norm, below and above the threshold 1.
    Tolerance: rtol 1e-6 (float32 rounding of one scalar product; torch's 1e-6 in the denominator is
    < 2e-7 relative here)."""
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((7, 5)), "b": {"c": rng.standard_normal(11)}}
    total = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * norm / total, grads)
    want = jax.tree.map(lambda g: g * min(1.0, 1.0 / (norm + 1e-6)), grads)
    f32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
    ours, state = state_lib.clip_by_global_norm(1.0).update(f32, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(f32, optax.EmptyState())
    for got, w, o in zip(jax.tree.leaves(ours), jax.tree.leaves(want), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(got, w, rtol=1e-6)
        np.testing.assert_allclose(got, o, rtol=1e-6)
    assert state == optax.EmptyState()  # checkpoints of optax's clip keep restoring


def test_bfloat16_compute_tracks_float32_through_the_kd_loss(tiny_and_batches):
    """The accelerator default: bfloat16 compute over float32 weights (hidden states, logits chunks and the MLP's
    hand-written backward in bfloat16). The KD loss is within 2 % of the float32 model's and every trained
    weight's gradient, vision tower included (nothing is frozen here), points the same way (cosine > 0.99;
    0.9985 at the least here): bfloat16 keeps 8 mantissa bits (2^-9 relative per rounding) through 2 layers.
    Gradients stay float32. What this checks is the bfloat16 path against the float32 one (a cast in the wrong
    place, a bfloat16 accumulator); the float32 backward passes are checked against references in
    tests/train/test_losses.py and tests/models/test_layers.py."""
    cfg, batches = tiny_and_batches
    s_params, t_params = init_params(Qwen2VL(cfg), jax.random.key(6)), init_params(Qwen2VL(cfg), jax.random.key(7))
    batch, kd = feed(batches[0]), losses.KDConfig()

    def loss_and_grad(dtype):
        student, teacher = Qwen2VL(cfg, dtype=dtype), Qwen2VL(cfg, dtype=dtype)

        def f(params):
            hidden, head = steps.hidden_and_head(student, params, batch)
            signal = steps.TeacherSource("online", teacher).signal(t_params, batch)
            return losses.chunked_loss(hidden, head, batch["labels"], kd=kd, chunk=64, teacher=signal)["loss"]

        return jax.jit(jax.value_and_grad(f))(s_params)

    (l16, g16), (l32, g32) = loss_and_grad("bfloat16"), loss_and_grad("float32")
    np.testing.assert_allclose(float(l16), float(l32), rtol=2e-2)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32, path
        name = state_lib.path_str(path)
        a, b = np.ravel(a), np.ravel(b)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos > 0.99, (name, cos)


def with_padding_rows(cfg, params, rows=64):
    """A teacher whose vocabulary has `rows` more (padding) rows than `cfg`'s, as Qwen2.5-VL-7B's 152064 against
    3B's 151936; the extra rows are large random vectors, so that using them anywhere would show."""
    padded_cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=cfg.text.vocab_size + rows))
    padded = jax.tree.map(lambda x: x, params)
    extra = jax.random.normal(jax.random.key(8), (rows, cfg.text.hidden_size)) * 3.0
    padded["model"]["embed_tokens"]["embedding"] = jnp.concatenate([params["model"]["embed_tokens"]["embedding"],
                                                                   extra])
    padded["lm_head"]["kernel"] = jnp.concatenate([params["lm_head"]["kernel"], extra.T], axis=1)
    return Qwen2VL(padded_cfg), padded


def test_kd_across_families_and_padded_vocabularies(tiny_and_batches):
    """A Qwen2.5-VL student distilled from a Qwen2.5-VL teacher whose vocabulary has 64 more (padding) rows, as
    7B's 152064 against 3B's 151936: the KD loss and its gradient equal those from the same teacher without the
    rows (teacher logits cut to the student's vocabulary, as released). A Qwen2-VL teacher (same tokenizer)
    distils into the Qwen2.5-VL student through the same step and lowers the KD loss."""
    cfg, batches = tiny_and_batches
    s_cfg = as_family(cfg, "qwen2_5_vl")
    student, teacher = Qwen2VL(s_cfg), Qwen2VL(s_cfg)
    s_params, t_params = init_params(student, jax.random.key(6)), init_params(teacher, jax.random.key(7))
    padded_teacher, padded = with_padding_rows(s_cfg, t_params)
    batch = feed(batches[0])
    kd = losses.KDConfig()

    def loss_and_grad(t_model, t_p):
        def f(params):
            hidden, head = steps.hidden_and_head(student, params, batch)
            signal = steps.TeacherSource("online", t_model).signal(t_p, batch)
            return losses.chunked_loss(hidden, head, batch["labels"], kd=kd, chunk=64, teacher=signal)["loss_kd"]
        return jax.jit(jax.value_and_grad(f))(s_params)

    (l_cut, g_cut), (l_pad, g_pad) = loss_and_grad(teacher, t_params), loss_and_grad(padded_teacher, padded)
    np.testing.assert_allclose(float(l_pad), float(l_cut), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_cut)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)

    q2_teacher = Qwen2VL(cfg)  # a Qwen2-VL teacher
    _, history = run(student, s_params, batches, 8, teacher=q2_teacher,
                     teacher_params=init_params(q2_teacher, jax.random.key(9)), kd=kd)
    assert history[-1]["loss_kd"] < history[0]["loss_kd"]
