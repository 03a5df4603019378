"""Cross-entropy and ClinKD's distillation loss, computed in sequence chunks with the LM head inside.

The (B, L, V) float32 logits never exist: hidden states are projected one chunk of positions at a
time, and the training loss (`chunked_loss`) computes each chunk's gradient in the LM head and in the
hidden states right there, in its forward pass, so nothing of the logits is kept or recomputed.
(V = 151,936 makes full logits 4.9 GB for a batch of 4 x 2048 tokens.)

Distillation as released (clinkd-spec §2.2), with every switch of §6:
    p = softmax(z_T / T)[:V_S],  log q = log_softmax(z_S / T)          (float32, teacher cut to the student vocab)
    KL_t = sum_v p_v (log p_v - log q_v)                                 forward KL(teacher || student)
           (kd.divergence: or the reverse KL, or GKD's generalised Jensen-Shannon divergence; `divergence`)
    mask: "released" = labels[t] != -100 (unshifted, the released off-by-one) | "aligned" = labels[t+1] != -100
    L_KD = sum_t w_t M_t KL_t    ("sum", released)  or  that / sum_t M_t  ("mean")
    L_CE = mean over supervised next-token targets
    L = (alpha * L_KD + L_CE) / (1 + alpha)                               (alpha = 0.5, T = 0.5, no T^2)

w_t = 1 reproduces the released code. `kd.token_weights` = "module:function" computes w_t inside each loss
chunk from the two distributions (clinkd-spec §2.4: v4's confidence-margin curriculum is named but
unpublished, so it is a hook, not a rule): `fn(teacher_logp, student_logp) -> (B, c)`, both (B, c, V)
log-probabilities at temperature T over the same entries (the student vocabulary; the k stored tokens with
pseudo-labels). The weights are coefficients: no gradient flows through them. `confidence_margin` below is
an example.

Over which rows the sums and means run (`sum_rows`): the released trainer computes L on one device's
micro-batch (2 rows) and DDP averages the devices' losses. So the batch is cut into groups of
`sum_rows` consecutive rows, L is computed per group and the groups are averaged: the loss is the same
on any mesh and for any data-parallel width. `sum_rows=0` sums over the whole global batch instead
(then the KD:CE ratio grows with the batch). SFT's CE is the mean over all supervised tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

IGNORE = -100
LOSS_BACKWARDS = ("fused", "autodiff")  # train.loss_backward: see `chunked_loss`
KD_MASKS = ("released", "aligned")
KD_REDUCTIONS = ("sum", "mean")
KD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
LEGACY_DIVERGENCES = {"forward": "forward_kl", "reverse": "reverse_kl"}  # kd.divergence's earlier names


@dataclasses.dataclass(frozen=True)
class KDConfig:
    alpha: float = 0.5
    temperature: float = 0.5
    mask: str = "released"  # "released" (unshifted labels) | "aligned" (next-token labels)
    reduction: str = "sum"  # "sum" (released) | "mean"
    divergence: str = "forward_kl"  # KL(teacher||student) | "reverse_kl" KL(student||teacher) | "jsd" (`divergence`)
    jsd_beta: float = 0.5  # "jsd": the teacher's weight in the mixture; 0 = forward KL, 1 = reverse KL (TRL's)
    use_ce: bool = True  # False: L = L_KD alone (the released trainer's other branch)
    sum_rows: int = 2  # rows per loss group: the released per-device micro-batch; 0 = the whole batch
    token_weights: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # None: w = 1 (released)

    def __post_init__(self):
        for name, allowed in (("mask", KD_MASKS), ("reduction", KD_REDUCTIONS), ("divergence", KD_DIVERGENCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"kd.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"kd.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.alpha < 0:
            raise ValueError(f"kd.alpha must be >= 0, got {self.alpha}")
        if self.sum_rows < 0:
            raise ValueError(f"kd.sum_rows must be >= 0, got {self.sum_rows}")


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
    """The teacher's signal when it runs in the step: its final hidden states (B, L, D_t) and its LM head (which
    may be wider than the student's vocabulary); the loss projects them chunk by chunk, never all logits."""

    hidden: jax.Array
    head: Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class CachedTopK:
    """The teacher's signal read with the batch (pseudo-labels, `clinkd_jax.train.pseudo_labels`): its top-k
    token ids and log-probabilities at temperature T, (B, L, k) each, and where they hold, (B, L)."""

    ids: jax.Array
    logp: jax.Array
    valid: jax.Array


# What the loss distils from: None (SFT), an online teacher, or cached top-k; on-policy samples are a third kind.
Teacher = OnlineTeacher | CachedTopK | None


def resolve_token_weights(spec: str) -> Callable | None:
    """"" -> None (uniform weights); "module:function" -> the function (raises ValueError naming what is wrong)."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"kd.token_weights={spec!r} must be 'module:function' (or '' for uniform weights)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"kd.token_weights={spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"kd.token_weights={spec!r} is not a function")
    return fn


def confidence_margin(teacher_logp: jax.Array, student_logp: jax.Array) -> jax.Array:
    """An example token weighting: the teacher's top-1 minus top-2 probability (confident tokens count more).
    Not the paper's v4 rule (unpublished); `kd.token_weights=clinkd_jax.train.losses:confidence_margin`."""
    del student_logp
    top2 = jax.lax.top_k(teacher_logp, 2)[0]
    return jnp.exp(top2[..., 0]) - jnp.exp(top2[..., 1])


def _weighted(kd: KDConfig, w: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Per-token KD weights of a chunk: the static ones times the hook's (held constant)."""
    if kd.token_weights is None:
        return w
    return w * jax.lax.stop_gradient(kd.token_weights(log_p, log_q).astype(jnp.float32))


def forward_kl(t: jax.Array, s: jax.Array) -> jax.Array:
    """KL(softmax(t) || softmax(s)) over the last axis, written as sum p (t - s) - lse(t) + lse(s) (sum p = 1):
    no (.., V) log-probabilities are formed, and the gradient in s is softmax(s) - p. The two-log_softmax form
    writes two vocabulary-wide arrays per position more, the KD step's largest elementwise cost on CPU."""
    lse_t = jax.nn.logsumexp(t, axis=-1, keepdims=True)
    p = jnp.exp(t - lse_t)
    return jnp.sum(p * (t - s), axis=-1) - lse_t[..., 0] + jax.nn.logsumexp(s, axis=-1)


def divergence(kind: str, beta: float, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """D(teacher p || student q) over the last axis, from log-probabilities (the vocabulary, or the cached top-k
    tokens and a tail bucket). "forward_kl" KL(p||q); "reverse_kl" KL(q||p); "jsd" the generalised Jensen-Shannon
    divergence of GKD (Agarwal et al. 2024), beta KL(p||m) + (1 - beta) KL(q||m) with m = beta p + (1 - beta) q, in
    TRL's convention: beta = 0 is the forward KL and beta = 1 the reverse KL (exactly, not the mixture's limit,
    which is 0). A bucket the teacher gives no mass to adds nothing to KL(p||.) (p log p -> 0)."""
    if kind == "jsd" and beta in (0, 1):
        kind = "forward_kl" if beta == 0 else "reverse_kl"
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    if kind == "forward_kl":
        return jnp.sum(p * (log_p - log_q), axis=-1)
    if kind == "reverse_kl":
        return jnp.sum(q * (log_q - log_p), axis=-1)
    log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
    kl_p = jnp.sum(jnp.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
    return beta * kl_p + (1 - beta) * jnp.sum(q * (log_q - log_m), axis=-1)


def with_tail(log_p_k: jax.Array, log_q_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cached top-k tokens' log-probabilities (.., k) and one more bucket for the mass outside them, (.., k + 1)
    each: the distributions the divergences that weigh the student's own mass compare on a pseudo-label store (the
    student's mass outside the teacher's top k is where it disagrees most). A tail the teacher gives nothing gets
    the smallest float32 instead of log 0."""
    def and_tail(lp):
        rest = 1.0 - jnp.sum(jnp.exp(lp), axis=-1, keepdims=True)
        return jnp.concatenate([lp, jnp.log(jnp.maximum(rest, jnp.finfo(jnp.float32).tiny))], axis=-1)

    return and_tail(log_p_k), and_tail(log_q_k)


def _chunks(x, chunk):
    """(B, L, ...) -> (L/chunk, B, chunk, ...), zero-padding L up to a multiple of `chunk`."""
    b, length = x.shape[:2]
    pad = (-length) % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)


def _chunked_inputs(hidden_bld, labels_bl, *, chunk, teacher: Teacher, kd, kd_weights_bl):
    """The per-position inputs of the loss in chunks (`_chunks` layout), scored positions first per row."""
    b, length, _ = hidden_bld.shape
    targets = jnp.concatenate([labels_bl[:, 1:], jnp.full((b, 1), IGNORE, labels_bl.dtype)], axis=1)
    ce_mask = targets != IGNORE
    kd_mask = (labels_bl != IGNORE) if kd.mask == "released" else ce_mask
    weights = jnp.ones((b, length), jnp.float32) if kd_weights_bl is None else kd_weights_bl.astype(jnp.float32)
    # Positions that enter no loss (image and prompt tokens, padding) are moved behind those that do, per row
    # and in order; chunks left with nothing to score skip the LM head (often half the positions, more with
    # large images). Per-row sums do not depend on the order.
    order = jnp.argsort(~(ce_mask | kd_mask), axis=1, stable=True)
    first = lambda x: _chunks(jax.vmap(lambda row, o: row[o])(x, order), chunk)
    xs = {"h": first(hidden_bld), "tgt": first(targets), "ce_m": first(ce_mask), "kd_m": first(kd_mask),
          "w": first(weights)}
    if isinstance(teacher, OnlineTeacher):
        xs["th"] = first(jax.lax.stop_gradient(teacher.hidden))
    elif isinstance(teacher, CachedTopK):
        xs["tk_ids"], xs["tk_logp"], xs["tk_valid"] = (first(x) for x in (teacher.ids, teacher.logp, teacher.valid))
    return xs


def _kd_mask(x):
    return x["kd_m"] & x["tk_valid"] if "tk_ids" in x else x["kd_m"]


def _scored(kd: KDConfig, distill: bool, head, teacher_head, x) -> dict[str, jax.Array]:
    """One chunk's per-row sums and counts, (B,) each."""
    logits = head(x["h"]).astype(jnp.float32)
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.clip(x["tgt"], 0, vocab - 1)[..., None], axis=-1)[..., 0]
    rows = lambda v: jnp.sum(v, axis=-1)  # over the chunk's positions, per row
    out = {"ce_sum": rows(jnp.where(x["ce_m"], lse - picked, 0.0)), "ce_count": rows(x["ce_m"]).astype(jnp.float32)}
    if not distill:
        return out
    m = _kd_mask(x)
    if "tk_ids" in x:
        log_q = jnp.take_along_axis(jax.nn.log_softmax(logits / kd.temperature, axis=-1), x["tk_ids"], axis=-1)
        log_p = x["tk_logp"].astype(jnp.float32)
        w = _weighted(kd, x["w"], log_p, log_q)
        if kd.divergence == "forward_kl":  # the k stored tokens, as the teacher's mass is there
            kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        else:
            kl = divergence(kd.divergence, kd.jsd_beta, *with_tail(log_p, log_q))
    else:
        t_logits = jax.lax.stop_gradient(teacher_head(x["th"]).astype(jnp.float32))[..., :vocab]
        t, s = t_logits / kd.temperature, logits / kd.temperature
        if kd.divergence == "forward_kl" and kd.token_weights is None:
            kl, w = forward_kl(t, s), x["w"]
        else:
            log_p, log_q = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
            kl = divergence(kd.divergence, kd.jsd_beta, log_p, log_q)
            w = _weighted(kd, x["w"], log_p, log_q)
    out["kd_sum"] = rows(jnp.where(m, kl * w, 0.0))
    out["kd_count"] = rows(m).astype(jnp.float32)
    return out


def token_losses(
    hidden_bld: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    labels_bl: jax.Array,
    *,
    chunk: int = 256,
    teacher: Teacher = None,
    kd: KDConfig = KDConfig(),
    kd_weights_bl: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Sums and counts per row: {"ce_sum", "ce_count", "kd_sum", "kd_count"} (float32, shape (B,)).

    `head(h)` maps (B, c, D) hidden states to (B, c, V) logits. `teacher`: what KD distils from (`Teacher`; with
    `CachedTopK` the forward KL runs over the k stored tokens). `kd_weights_bl` is the per-token weight hook
    (uniform = released; the v4 curriculum plugs in here).
    Differentiable as written (JAX keeps each scored chunk's logits for the backward pass); a training step
    takes `chunked_loss`, whose gradient is computed during the forward pass.
    """
    xs = _chunked_inputs(hidden_bld, labels_bl, chunk=chunk, teacher=teacher, kd=kd, kd_weights_bl=kd_weights_bl)
    distill = teacher is not None
    keys = ("ce_sum", "ce_count") + (("kd_sum", "kd_count") if distill else ())
    return _sums(functools.partial(_scored, kd, distill, head, _head_of(teacher)), keys, xs)


def _head_of(teacher: Teacher):
    return teacher.head if isinstance(teacher, OnlineTeacher) else None


def chunked_loss(
    hidden_bld: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    labels_bl: jax.Array,
    *,
    kd: KDConfig | None = None,
    backward: str = "fused",
    chunk: int = 256,
    teacher: Teacher = None,
    kd_weights_bl: jax.Array | None = None,
    unrolled: bool = False,
) -> dict[str, jax.Array]:
    """The training loss: `combine(token_losses(...), kd)` (`kd=None`: SFT), as {"loss", "loss_ce",
    ["loss_kd",] "tokens"}. Only "loss" carries a gradient; the parts are for logging.

    backward="fused" (`train.loss_backward`): the gradient in the LM head and in the hidden states is
    computed chunk by chunk during the forward pass, for the loss itself (each row's sums enter the loss with
    a coefficient that depends on the label masks only, `coefficients`, so it is known before the head runs);
    the backward pass multiplies it by the loss's cotangent. Three LM-head matmuls per scored chunk (logits,
    then the gradients in the hidden states and in the head); no logits kept or recomputed, the teacher's
    computed once. The head's (D, V) gradient is held from the loss's forward pass on, where the backward
    pass would have made it first thing.
    "autodiff": JAX differentiates the chunk loop (each scored chunk's float32 logits kept for the backward).
    `unrolled` (fused only): every chunk in straight-line code, scored or not, instead of a loop that ends at the
    last scored chunk: the program `clinkd_jax.aot` asks XLA's cost analysis about (which counts a loop's body
    once); same values.
    """
    distill = teacher is not None
    if distill != (kd is not None):
        raise ValueError("distillation takes kd and a teacher (online or cached top-k); SFT neither")
    if backward not in LOSS_BACKWARDS:
        raise ValueError(f"train.loss_backward={backward!r} is not one of {LOSS_BACKWARDS}")
    kd_ = kd or KDConfig()
    if backward == "autodiff":
        return combine(token_losses(hidden_bld, head, labels_bl, chunk=chunk, teacher=teacher, kd=kd_,
                                    kd_weights_bl=kd_weights_bl), kd)
    xs = _chunked_inputs(hidden_bld, labels_bl, chunk=chunk, teacher=teacher, kd=kd_, kd_weights_bl=kd_weights_bl)
    counts = {"ce_count": jnp.sum(xs["ce_m"], axis=(0, 2)).astype(jnp.float32)}
    if distill:
        counts["kd_count"] = jnp.sum(_kd_mask(xs), axis=(0, 2)).astype(jnp.float32)
    coef = coefficients(counts, kd)
    keys = ("ce_sum", "ce_count") + (("kd_sum", "kd_count") if distill else ())
    loss, totals = _fused(functools.partial(_scored, kd_, distill), keys, xs, head, _head_of(teacher), coef,
                          unrolled)
    return {**combine(totals, kd), "loss": loss}


def _has_scores(x) -> jax.Array:
    return jnp.any(x["ce_m"] | x["kd_m"])


def _sums(scored, keys, xs):
    """Per-row sums over the chunks; a chunk with nothing to score skips the LM head (`lax.cond`)."""
    zero = {k: jnp.zeros(xs["h"].shape[1:2], jnp.float32) for k in keys}

    def body(carry, x):
        out = jax.lax.cond(_has_scores(x), scored, lambda x: zero, x)
        return jax.tree.map(jnp.add, carry, out), None

    return jax.lax.scan(body, zero, xs)[0]


def _fused(scored, keys, xs, head, teacher_head, coef, unrolled=False):
    """(loss, per-row sums) with the loss's gradient computed during the forward pass (`chunked_loss`).

    The loop runs over the scored chunks only: they are a prefix (scored positions are sorted first), and it
    ends at the last one whatever the order (an unscored chunk inside adds zeros: correct, only slower).
    Chunk 0 always runs, so the head's gradient starts from a chunk's, not from zeros. Differentiating the
    chunk scan instead recomputed each chunk's logits (or kept them) and added a (D, V) gradient per chunk,
    scored or not."""
    s_fn, s_consts = jax.closure_convert(head, xs["h"][0])
    t_fn, t_consts = (None, []) if teacher_head is None else jax.closure_convert(teacher_head, xs["th"][0])
    loss_of = functools.partial(_weighted_sum, coef)

    def chunk(s_consts, x):
        t_head = None if t_fn is None else (lambda h: t_fn(h, *t_consts))
        return scored(lambda h: s_fn(h, *s_consts), t_head, x)

    @jax.custom_vjp
    def fused(s_consts, xs):
        sums = _sums(functools.partial(chunk, s_consts), keys, xs)
        return loss_of(sums), sums

    def fwd(s_consts, xs):
        def grads(x):  # one chunk's sums, and their gradients for the loss's coefficients
            sums, vjp = jax.vjp(lambda s, h: chunk(s, {**x, "h": h}), s_consts, x["h"])
            return sums, vjp({k: coef.get(k, jnp.zeros_like(v)) for k, v in sums.items()})

        at = lambda i: jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, i, keepdims=False), xs)
        scored_chunks = jax.vmap(_has_scores)(xs)
        n = jnp.max(jnp.where(scored_chunks, jnp.arange(1, scored_chunks.shape[0] + 1), 0))
        sums, (d_s, dh0) = grads(at(0))

        def body(i, carry):
            sums, d_s, dh = carry
            out, (g_s, g_h) = grads(at(i))
            add = functools.partial(jax.tree.map, jnp.add)
            return add(sums, out), add(d_s, g_s), jax.lax.dynamic_update_index_in_dim(dh, g_h, i, 0)

        dh = jnp.zeros_like(xs["h"]).at[0].set(dh0)
        if unrolled:
            carry = (sums, d_s, dh)
            for i in range(1, scored_chunks.shape[0]):
                carry = body(i, carry)
            sums, d_s, dh = carry
        else:
            sums, d_s, dh = jax.lax.fori_loop(1, n, body, (sums, d_s, dh))
        return (loss_of(sums), sums), (d_s, dh)

    def bwd(res, ct):
        (d_s, dh), (g, _) = res, ct  # the sums leave through stop_gradient: their cotangent is zero
        scale = lambda v: (g * v).astype(v.dtype)
        return jax.tree.map(scale, d_s), {k: scale(dh) if k == "h" else None for k in xs}

    fused.defvjp(fwd, bwd)
    loss, sums = fused(s_consts, xs)
    return loss, jax.lax.stop_gradient(sums)


def coefficients(counts: dict[str, jax.Array], kd: KDConfig | None) -> dict[str, jax.Array]:
    """{"ce_sum": (B,), ["kd_sum": (B,)]}: the loss is the sum over rows of these times the per-row sums. They
    depend on the counts (the label masks) only. SFT: 1 / supervised tokens. KD: per group of `kd.sum_rows`
    rows, L_CE is the group's CE sum over its count and L_KD its KL sum (or mean), mixed as (alpha * L_KD +
    L_CE) / (1 + alpha), and the groups that hold supervised tokens are averaged."""
    ce_count = counts["ce_count"]
    if kd is None or "kd_count" not in counts:  # SFT
        return {"ce_sum": jnp.broadcast_to(1.0 / jnp.maximum(jnp.sum(ce_count), 1.0), ce_count.shape)}
    g, group_totals, used = _loss_groups(counts, kd)
    per_row = lambda v: jnp.repeat(v, g)  # each row gets its group's value
    ce_g, kd_g = per_row(group_totals(ce_count)), per_row(group_totals(counts["kd_count"]))
    share = per_row(jnp.where(used, 1.0, 0.0) / jnp.maximum(jnp.sum(used), 1))  # 1 / (groups used)
    kd_scale = 1.0 if kd.reduction == "sum" else 1.0 / jnp.maximum(kd_g, 1.0)
    if not kd.use_ce:
        return {"ce_sum": jnp.zeros_like(ce_count), "kd_sum": share * kd_scale}
    return {"ce_sum": share / ((1.0 + kd.alpha) * jnp.maximum(ce_g, 1.0)),
            "kd_sum": share * kd.alpha / (1.0 + kd.alpha) * kd_scale}


def combine(totals: dict[str, jax.Array], kd: KDConfig | None) -> dict[str, jax.Array]:
    """The training loss (`coefficients`) and its parts from per-row statistics: SFT = CE mean over all
    supervised tokens; KD = per group of `kd.sum_rows` rows (L_CE mean, L_KD sum or mean, mixed), then the
    mean over the groups that hold supervised tokens."""
    coef = coefficients(totals, kd)
    loss = _weighted_sum(coef, totals)
    tokens = jnp.sum(totals["ce_count"])
    if "kd_sum" not in coef:
        return {"loss": loss, "loss_ce": loss, "tokens": tokens}
    _, group_totals, used = _loss_groups(totals, kd)
    t = {k: group_totals(v) for k, v in totals.items()}
    ce = t["ce_sum"] / jnp.maximum(t["ce_count"], 1.0)
    l_kd = t["kd_sum"] if kd.reduction == "sum" else t["kd_sum"] / jnp.maximum(t["kd_count"], 1.0)
    mean = lambda v: jnp.sum(jnp.where(used, v, 0.0)) / jnp.maximum(jnp.sum(used), 1)
    return {"loss": loss, "loss_ce": mean(ce), "loss_kd": mean(l_kd), "tokens": tokens}


def _loss_groups(counts: dict[str, jax.Array], kd: KDConfig):
    """KD's loss groups of `kd.sum_rows` consecutive rows: (rows per group, per-row values -> group totals,
    (groups,) bool: the group holds supervised tokens; groups of filler rows only do not count)."""
    b = counts["ce_count"].shape[0]
    g = kd.sum_rows or b
    if b % g:
        raise ValueError(f"a batch of {b} rows does not split into loss groups of kd.sum_rows={g}")
    group_totals = lambda v: jnp.sum(v.reshape(-1, g), axis=1)
    return g, group_totals, (group_totals(counts["ce_count"]) + group_totals(counts["kd_count"])) > 0


def _weighted_sum(coef, sums):
    return sum(jnp.sum(c * sums[k]) for k, c in coef.items())
