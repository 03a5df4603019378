"""Chunked CE and ClinKD distillation loss against a direct NumPy transcription of clinkd-spec §2.2.

Tolerance: rtol 1e-5 (float32 sums of a few hundred terms; float64 NumPy reference)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinkd_jax.train import losses as L

B, T, D, VS, VT = 2, 13, 8, 11, 14  # teacher vocabulary wider than the student's (it gets cut)


def data(seed=0):
    rng = np.random.default_rng(seed)
    hs, ht = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    ws, wt = rng.standard_normal((D, VS)), rng.standard_normal((D, VT))
    labels = rng.integers(0, VS, (B, T))
    labels[:, :4] = -100  # prompt
    labels[0, 9:] = -100  # right padding
    labels[1, 6] = -100  # a hole
    weights = rng.uniform(0.5, 1.5, (B, T))
    return hs, ht, ws, wt, labels, weights


def log_softmax(z, xp=np):
    z = z - z.max(-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(-1, keepdims=True))


def divergence_ref(lp, lq, kd: L.KDConfig, xp=np):
    """Per position, from the teacher's and the student's log-probabilities: KL(p||q), KL(q||p), or the
    generalised JSD with the mixture m = beta p + (1 - beta) q formed in probability space."""
    p, q = xp.exp(lp), xp.exp(lq)
    if kd.divergence == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if kd.divergence == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    lm = xp.log(kd.jsd_beta * p + (1 - kd.jsd_beta) * q)
    return kd.jsd_beta * (p * (lp - lm)).sum(-1) + (1 - kd.jsd_beta) * (q * (lq - lm)).sum(-1)


def reference(hs, ht, ws, wt, labels, weights, kd: L.KDConfig, xp=np):
    """Line by line the formula in clinkd-spec §2.2 on dense logits (float64 in NumPy; `xp=jnp`: the same in
    float32 JAX, to differentiate)."""
    zs, zt = hs @ ws, (ht @ wt)[..., :VS]
    # L_CE: shifted next-token CE, mean over targets != -100
    logp = log_softmax(zs, xp)
    tgt = labels[:, 1:]
    m = tgt != -100
    ce = -xp.sum(xp.where(m, xp.take_along_axis(logp[:, :-1], xp.clip(tgt, 0, None)[..., None], -1)[..., 0],
                          0)) / m.sum()
    lp, lq = log_softmax(zt / kd.temperature, xp), log_softmax(zs / kd.temperature, xp)
    kl = divergence_ref(lp, lq, kd, xp)
    if kd.mask == "released":
        mask = labels != -100
    else:
        mask = xp.concatenate([labels[:, 1:] != -100, xp.zeros((B, 1), bool)], 1)
    l_kd = xp.sum(kl * weights * mask)
    if kd.reduction == "mean":
        l_kd /= mask.sum()
    total = (kd.alpha * l_kd + ce) / (1 + kd.alpha) if kd.use_ce else l_kd
    return ce, l_kd, total


SWITCHES = [L.KDConfig(mask=m, reduction=r, divergence=d, alpha=a, temperature=t, jsd_beta=0.3)
            for (m, r, d), (a, t) in itertools.product(
                itertools.product(("released", "aligned"), ("sum", "mean"),
                                  L.KD_DIVERGENCES), ((0.5, 0.5), (1.0, 2.0)))]


@pytest.mark.parametrize("kd", SWITCHES,
                         ids=lambda k: f"{k.mask}-{k.reduction}-{k.divergence}-a{k.alpha}-T{k.temperature}")
def test_matches_spec_formula(kd):
    hs, ht, ws, wt, labels, weights = data()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    teacher = L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt))
    totals = L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels), chunk=4, teacher=teacher, kd=kd,
                            kd_weights_bl=f32(weights))
    out = L.combine(totals, kd)
    ce, l_kd, total = reference(hs, ht, ws, wt, labels, weights, kd)
    np.testing.assert_allclose([out["loss_ce"], out["loss_kd"], out["loss"]], [ce, l_kd, total], rtol=1e-5)


def test_kd_only_branch_and_plain_ce():
    hs, ht, ws, wt, labels, weights = data(1)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kd = L.KDConfig(use_ce=False)
    out = L.combine(L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels), chunk=5,
                                   teacher=L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt)), kd=kd,
                                   kd_weights_bl=f32(weights)), kd)
    np.testing.assert_allclose(out["loss"], reference(hs, ht, ws, wt, labels, weights, kd)[2], rtol=1e-5)
    sft = L.combine(L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels)), None)
    np.testing.assert_allclose(sft["loss"], reference(hs, ht, ws, wt, labels, weights, kd)[0], rtol=1e-5)
    assert "loss_kd" not in sft


KD_VARIANTS = (None, L.KDConfig(), L.KDConfig(mask="aligned", divergence="reverse_kl", reduction="mean"),
               L.KDConfig(divergence="jsd", jsd_beta=0.7, temperature=2.0),
               L.KDConfig(sum_rows=1, use_ce=False, alpha=2.0),
               L.KDConfig(temperature=0.7, token_weights=L.confidence_margin))


@pytest.mark.parametrize("chunk, backward, prompt", [(1, "fused", 4), (4, "fused", 4), (13, "fused", 4),
                                                     (64, "fused", 4), (4, "fused", 10), (1, "fused", 10),
                                                     (4, "autodiff", 4), (4, "autodiff", 10)])
def test_chunked_gradients_equal_the_dense_formula(chunk, backward, prompt):
    """Any chunk size (with padding of the last chunk), the gradient computed in the loss's forward pass or by
    autodiff (`train.loss_backward`): the loss and its gradients in the LM head and in the hidden states are
    jax.grad of the spec formula on dense float32 logits (`reference` in JAX), for SFT and KD switch sets
    (one loss group per row without CE, and a token-weight hook, whose weights are constants). `prompt=10`
    leaves 2-3 scored positions per row, so most chunks are skipped in both passes.
    Tolerance: rtol 1e-5 / atol 1e-6 (float32 both sides; only the summation order differs)."""
    hs, ht, ws, wt, labels, weights = data(2)
    labels[:, :prompt] = -100
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    for kd in KD_VARIANTS:
        def ours(ws_, hs_):
            return L.chunked_loss(hs_, lambda h: h @ ws_, jnp.asarray(labels), kd=kd, backward=backward, chunk=chunk,
                                  teacher=None if kd is None else L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt)),
                                  kd_weights_bl=f32(weights))["loss"]

        def dense(ws_, hs_):
            w = f32(weights)
            if kd is not None and kd.token_weights is not None:
                lp = jax.nn.log_softmax((f32(ht) @ f32(wt))[..., :VS] / kd.temperature, axis=-1)
                lq = jax.nn.log_softmax((hs_ @ ws_) / kd.temperature, axis=-1)
                w = w * jax.lax.stop_gradient(kd.token_weights(lp, lq))
            if kd is not None and kd.sum_rows == 1:  # one loss group per row, averaged over rows with labels
                rows = [i for i in range(B) if np.any(labels[i] != -100)]
                return sum(reference(hs_[i:i + 1], f32(ht)[i:i + 1], ws_, f32(wt), jnp.asarray(labels)[i:i + 1],
                                     w[i:i + 1], kd, xp=jnp)[2] for i in rows) / len(rows)
            ce, _, total = reference(hs_, f32(ht), ws_, f32(wt), jnp.asarray(labels), w, kd or L.KDConfig(), xp=jnp)
            return ce if kd is None else total

        (v, g), (want_v, want_g) = (jax.value_and_grad(f, argnums=(0, 1))(f32(ws), f32(hs)) for f in (ours, dense))
        np.testing.assert_allclose(v, want_v, rtol=1e-5, err_msg=str(kd))
        for got, want in zip(g, want_g):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(kd))


@pytest.mark.parametrize("backward", ["fused", "autodiff"])
def test_loss_groups_of_filler_rows_do_not_count(backward):
    """kd.sum_rows=2 over 4 rows where the second group is filler (every label -100): the loss, its parts and
    its gradient are those of the first group alone (reference). The gradient is taken of -3 x the loss, so
    the fused backward pass must scale what its forward pass computed by the loss's cotangent."""
    hs, ht, ws, wt, labels, weights = data(5)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    two = lambda x: np.concatenate([x, x])
    labels4 = two(labels)
    labels4[B:] = -100
    kd = L.KDConfig(reduction="mean")

    def ours(ws_):
        return L.chunked_loss(f32(two(hs)), lambda h: h @ ws_, jnp.asarray(labels4), kd=kd, backward=backward,
                              chunk=4, teacher=L.OnlineTeacher(f32(two(ht)), lambda h: h @ f32(wt)),
                              kd_weights_bl=f32(two(weights)))

    def dense(ws_):
        return reference(f32(hs), f32(ht), ws_, f32(wt), jnp.asarray(labels), f32(weights), kd, xp=jnp)[2]

    out = ours(f32(ws))
    ce, l_kd, total = reference(hs, ht, ws, wt, labels, weights, kd)
    np.testing.assert_allclose([out["loss"], out["loss_ce"], out["loss_kd"]], [total, ce, l_kd], rtol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda w: -3.0 * ours(w)["loss"])(f32(ws)),
                               jax.grad(lambda w: -3.0 * dense(w))(f32(ws)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward", ["fused", "autodiff"])
def test_nothing_to_score_gives_zero_loss_and_gradients(backward):
    """A batch of filler rows (every label -100): no chunk is scored, loss and gradients are exactly 0."""
    hs, ht, ws, wt, labels, weights = data(2)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kd = L.KDConfig()
    loss = lambda ws_, hs_: L.chunked_loss(
        hs_, lambda h: h @ ws_, jnp.full((B, T), -100), kd=kd, backward=backward, chunk=4,
        teacher=L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt)))["loss"]
    v, (g_w, g_h) = jax.value_and_grad(loss, argnums=(0, 1))(f32(ws), f32(hs))
    assert float(v) == 0.0 and not np.any(g_w) and not np.any(g_h)


def test_bad_chunked_loss_arguments():
    hs, ht, ws, wt, labels, _ = data()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    head = lambda h: h @ f32(ws)
    with pytest.raises(ValueError, match="train.loss_backward='remat' is not one of"):
        L.chunked_loss(f32(hs), head, jnp.asarray(labels), backward="remat")
    with pytest.raises(ValueError, match="distillation takes kd and a teacher"):
        L.chunked_loss(f32(hs), head, jnp.asarray(labels), kd=L.KDConfig())


def test_lm_head_runs_only_on_chunks_that_hold_scored_positions():
    """Positions that enter no loss (prompt, padding) are moved behind the scored ones, and a chunk with none
    of the latter skips the LM head: with chunk 1 the head runs max-over-rows(#scored) times, not L times;
    the loss is still the spec formula's (NumPy reference, rtol 1e-5)."""
    hs, ht, ws, wt, labels, weights = data(4)
    labels[:, : T - 4] = -100  # a long prompt: 3-4 scored positions per row out of 13
    kd = L.KDConfig()
    calls = []

    def head(h):
        jax.debug.callback(lambda: calls.append(1))
        return h @ jnp.float32(ws)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    t = L.token_losses(f32(hs), head, jnp.asarray(labels), chunk=1,
                       teacher=L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt)), kd=kd, kd_weights_bl=f32(weights))
    loss = float(L.combine(t, kd)["loss"])
    jax.effects_barrier()
    targets = np.concatenate([labels[:, 1:], np.full((B, 1), -100)], 1)
    scored = ((targets != -100) | (labels != -100)).sum(1).max()  # kd.mask "released" scores label positions
    assert len(calls) == scored < T
    np.testing.assert_allclose(loss, reference(hs, ht, ws, wt, labels, weights, kd)[2], rtol=1e-5)


def test_no_full_vocab_logits_in_the_compiled_step():
    """With chunk c the largest float32 logits buffer the compiled loss holds is (B, c, V), not (B, L, V)."""
    b, length, d, v, c = 2, 512, 16, 4096, 64
    h = jnp.zeros((b, length, d))
    w = jnp.zeros((d, v))
    lab = jnp.zeros((b, length), jnp.int32)
    f = jax.jit(jax.grad(lambda w_: L.chunked_loss(h, lambda x: x @ w_, lab, chunk=c)["loss"]))
    hlo = f.lower(w).compile().as_text()
    assert f"f32[{b},{length},{v}]" not in hlo and f"[{b},{c},{v}]" in hlo


def test_token_weight_hook_changes_the_loss_as_by_hand():
    """`kd.token_weights` (a module:function) multiplies each token's KL by its weight, computed from the
    teacher/student log-probabilities at temperature T in each chunk; here the teacher's top-1 minus top-2
    probability, transcribed in NumPy. The weights are constants: the gradient is that of the weighted
    sum with the weights held fixed."""
    hs, ht, ws, wt, labels, weights = data(4)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kd = L.KDConfig(temperature=0.7, token_weights=L.resolve_token_weights("clinkd_jax.train.losses:confidence_margin"))
    p = np.sort(np.exp(log_softmax((ht @ wt)[..., :VS] / kd.temperature)), -1)
    margin = p[..., -1] - p[..., -2]

    teacher = L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt))

    def ours(ws_):
        totals = L.token_losses(f32(hs), lambda h: h @ ws_, jnp.asarray(labels), chunk=4, teacher=teacher, kd=kd,
                                kd_weights_bl=f32(weights))
        return L.combine(totals, kd)["loss_kd"]

    _, l_kd, _ = reference(hs, ht, ws, wt, labels, weights * margin, kd)
    _, unweighted, _ = reference(hs, ht, ws, wt, labels, weights, kd)
    np.testing.assert_allclose(ours(f32(ws)), l_kd, rtol=1e-5)
    assert abs(l_kd - unweighted) > 0.1 * abs(unweighted)  # the hook matters at this size
    fixed = dataclasses.replace(kd, token_weights=None)  # the same weights given as constants
    const = lambda ws_: L.combine(L.token_losses(
        f32(hs), lambda h: h @ ws_, jnp.asarray(labels), chunk=4, teacher=teacher, kd=fixed,
        kd_weights_bl=f32(weights * margin)), fixed)["loss_kd"]
    np.testing.assert_allclose(jax.grad(ours)(f32(ws)), jax.grad(const)(f32(ws)), rtol=1e-4, atol=1e-6)
    # a weight that depends on the student: still a constant for the gradient
    kd = dataclasses.replace(kd, token_weights=lambda lp, lq: jnp.exp(jnp.max(lq, axis=-1)))
    peak = np.exp(log_softmax((hs @ ws) / kd.temperature).max(-1))
    np.testing.assert_allclose(ours(f32(ws)), reference(hs, ht, ws, wt, labels, weights * peak, kd)[1], rtol=1e-5)
    margin = peak  # what `const` weighs with
    np.testing.assert_allclose(jax.grad(ours)(f32(ws)), jax.grad(const)(f32(ws)), rtol=1e-4, atol=1e-6)
    for bad, message in (("nomodule", "must be 'module:function'"), ("clinkd_jax.train.losses:nope",
                                                                     "has no attribute")):
        with pytest.raises(ValueError, match=message):
            L.resolve_token_weights(bad)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_forward_kl_form_equals_log_softmax_form(scale):
    """The KD step's KL(p||q) = sum p (t - s) - lse t + lse s against the float64 log-softmax form, value and
    gradient in s, at logit scales of a random init (1) and of a trained LM head (30: big cancellations).
    Tolerance: atol 2e-5 on KL values of 0.1-20 (float32 rounding of lse terms of |z| <= ~150; the
    reference is float64), rtol 1e-4 on the gradient."""
    rng = np.random.default_rng(3)
    t, s = rng.standard_normal((2, 5, 300)) * scale, rng.standard_normal((2, 5, 300)) * scale
    lp, lq = log_softmax(t), log_softmax(s)
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    got = L.forward_kl(jnp.float32(t), jnp.float32(s))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    grad = jax.grad(lambda z: jnp.sum(L.forward_kl(jnp.float32(t), z)))(jnp.float32(s))
    np.testing.assert_allclose(grad, np.exp(lq) - np.exp(lp), rtol=1e-4, atol=1e-6)


def test_bad_switches():
    with pytest.raises(ValueError, match="kd.mask='shifted' is not one of"):
        L.KDConfig(mask="shifted")
    with pytest.raises(ValueError, match="kd.temperature must be > 0"):
        L.KDConfig(temperature=0)


@pytest.mark.parametrize("mask, token_weights", [("released", ""), ("aligned", ""),
                                                 ("released", "clinkd_jax.train.losses:confidence_margin")])
def test_cached_topk_with_full_vocab_equals_online(mask, token_weights):
    """Pseudo-label path (teacher top-k cached, k = V) gives the online KD sum and counts (with a token-weight
    hook too: it sees the same distributions, in another order)."""
    hs, ht, ws, wt, labels, weights = data(3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kd = L.KDConfig(mask=mask, token_weights=L.resolve_token_weights(token_weights))
    online = L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels), chunk=4,
                            teacher=L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt)), kd=kd)
    logp = jax.nn.log_softmax(f32(ht @ wt)[..., :VS] / kd.temperature, axis=-1)
    vals, ids = jax.lax.top_k(logp, VS)
    cached = L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels), chunk=4, kd=kd,
                            teacher=L.CachedTopK(ids, vals, jnp.ones((B, T), bool)))
    for key in ("kd_sum", "kd_count", "ce_sum", "ce_count"):
        np.testing.assert_allclose(cached[key], online[key], rtol=1e-5, err_msg=key)
    # and the training loss's gradient, computed in the fused forward pass of each (rtol 1e-4: a sum of V
    # terms in another order, through the softmax)
    grad = lambda **teacher: jax.grad(lambda w: L.chunked_loss(f32(hs), lambda h: h @ w, jnp.asarray(labels), kd=kd,
                                                               chunk=4, **teacher)["loss"])(f32(ws))
    np.testing.assert_allclose(grad(teacher=L.CachedTopK(ids, vals, jnp.ones((B, T), bool))),
                               grad(teacher=L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt))),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_cached_topk_tail_bucket(divergence):
    """The reverse KL and the JSD on a pseudo-label store compare the k stored tokens plus one bucket for the rest
    of each distribution: with k = V that bucket is empty and the online values come back (atol 1e-5: the empty
    bucket holds a float32 rounding of 1 - sum p); with k = 4, the divergence of the two 5-bucket distributions
    (float64 NumPy, rtol 1e-5)."""
    hs, ht, ws, wt, labels, _ = data(4)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kd = L.KDConfig(divergence=divergence, jsd_beta=0.3, temperature=0.7)
    logp = jax.nn.log_softmax(f32(ht @ wt)[..., :VS] / kd.temperature, axis=-1)
    online = L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels), chunk=4, kd=kd,
                            teacher=L.OnlineTeacher(f32(ht), lambda h: h @ f32(wt)))
    for k in (VS, 4):
        vals, ids = jax.lax.top_k(logp, k)
        cached = L.token_losses(f32(hs), lambda h: h @ f32(ws), jnp.asarray(labels), chunk=4, kd=kd,
                                teacher=L.CachedTopK(ids, vals, jnp.ones((B, T), bool)))
        if k == VS:
            np.testing.assert_allclose(cached["kd_sum"], online["kd_sum"], rtol=1e-5, atol=1e-5)
            continue
        p_k = np.exp(np.asarray(vals, np.float64))
        q = np.exp(log_softmax(hs @ ws / kd.temperature))
        q_k = np.take_along_axis(q, np.asarray(ids), -1)
        p5 = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)
        q5 = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
        per_token = divergence_ref(np.log(p5), np.log(q5), kd)
        expected = np.sum(np.where(labels != -100, per_token, 0.0), axis=1)
        np.testing.assert_allclose(cached["kd_sum"], expected, rtol=1e-5)
        assert np.all(np.asarray(cached["kd_sum"]) > 0)
