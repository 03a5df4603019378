"""Cross-entropy and ClinKD's distillation loss, computed in sequence chunks with the LM head inside.

The (B, L, V) float32 logits never exist: hidden states are projected one chunk of positions at a
time inside a rematerialised scan, so the forward keeps one chunk of logits and the backward
recomputes it. (V = 151,936 makes full logits 4.9 GB for a batch of 4 x 2048 tokens.)

Distillation as released (clinkd-spec §2.2), with every switch of §6:
    p = softmax(z_T / T)[:V_S],  log q = log_softmax(z_S / T)          (float32, teacher cut to the student vocab)
    KL_t = sum_v p_v (log p_v - log q_v)                                 forward KL(teacher || student)
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


@dataclasses.dataclass(frozen=True)
class KDConfig:
    alpha: float = 0.5
    temperature: float = 0.5
    mask: str = "released"  # "released" (unshifted labels) | "aligned" (next-token labels)
    reduction: str = "sum"  # "sum" (released) | "mean"
    divergence: str = "forward"  # "forward" KL(teacher||student) | "reverse" KL(student||teacher)
    use_ce: bool = True  # False: L = L_KD alone (the released trainer's other branch)
    sum_rows: int = 2  # rows per loss group: the released per-device micro-batch; 0 = the whole batch
    token_weights: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # None: w = 1 (released)

    def __post_init__(self):
        for name, allowed in (("mask", ("released", "aligned")), ("reduction", ("sum", "mean")),
                              ("divergence", ("forward", "reverse"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"kd.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")
        if self.alpha < 0:
            raise ValueError(f"kd.alpha must be >= 0, got {self.alpha}")
        if self.sum_rows < 0:
            raise ValueError(f"kd.sum_rows must be >= 0, got {self.sum_rows}")


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
    no (.., V) log-probabilities are formed, and the gradient in s is softmax(s) - p. On CPU the two
    log_softmax + exp form was the KD step's largest elementwise cost (bench/README.md, issue 17)."""
    lse_t = jax.nn.logsumexp(t, axis=-1, keepdims=True)
    p = jnp.exp(t - lse_t)
    return jnp.sum(p * (t - s), axis=-1) - lse_t[..., 0] + jax.nn.logsumexp(s, axis=-1)


def _chunks(x, chunk):
    """(B, L, ...) -> (L/chunk, B, chunk, ...), zero-padding L up to a multiple of `chunk`."""
    b, length = x.shape[:2]
    pad = (-length) % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)


def token_losses(
    hidden_bld: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    labels_bl: jax.Array,
    *,
    chunk: int = 256,
    teacher_hidden_bld: jax.Array | None = None,
    teacher_head: Callable[[jax.Array], jax.Array] | None = None,
    kd: KDConfig = KDConfig(),
    kd_weights_bl: jax.Array | None = None,
    teacher_topk: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    remat: bool = True,
) -> dict[str, jax.Array]:
    """Sums and counts per row: {"ce_sum", "ce_count", "kd_sum", "kd_count"} (float32, shape (B,)).

    `head(h)` maps (B, c, D) hidden states to (B, c, V) logits; the teacher's head may be wider.
    `kd_weights_bl` is the per-token weight hook (uniform = released; the v4 curriculum plugs in here).
    `teacher_topk` = (ids (B, L, k), log p (B, L, k), valid (B, L)): cached pseudo-labels instead of a
    teacher forward (`clinkd_jax.train.pseudo_labels`); forward KL over the k stored tokens.
    `remat=False` keeps each chunk's logits for the backward pass instead of recomputing them: one LM-head
    matmul less per chunk, (B, L, V) float32 of memory more (`train.loss_remat`; a CPU choice).
    """
    b, length, _ = hidden_bld.shape
    targets = jnp.concatenate([labels_bl[:, 1:], jnp.full((b, 1), IGNORE, labels_bl.dtype)], axis=1)
    ce_mask = targets != IGNORE
    kd_mask = (labels_bl != IGNORE) if kd.mask == "released" else ce_mask
    weights = jnp.ones((b, length), jnp.float32) if kd_weights_bl is None else kd_weights_bl.astype(jnp.float32)
    distill = teacher_hidden_bld is not None or teacher_topk is not None
    # Positions that enter no loss (image and prompt tokens, padding) are moved behind those that do, per row
    # and in order; chunks left with nothing to score skip the LM head (often half the positions, more with
    # large images). Per-row sums do not depend on the order.
    order = jnp.argsort(~(ce_mask | kd_mask), axis=1, stable=True)
    first = lambda x: _chunks(jax.vmap(lambda row, o: row[o])(x, order), chunk)
    xs = {"h": first(hidden_bld), "tgt": first(targets), "ce_m": first(ce_mask), "kd_m": first(kd_mask),
          "w": first(weights)}
    if teacher_hidden_bld is not None:
        xs["th"] = first(jax.lax.stop_gradient(teacher_hidden_bld))
    if teacher_topk is not None:
        xs["tk_ids"], xs["tk_logp"], xs["tk_valid"] = (first(x) for x in teacher_topk)

    def scored(head, teacher_head, x):
        logits = head(x["h"]).astype(jnp.float32)
        vocab = logits.shape[-1]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.clip(x["tgt"], 0, vocab - 1)[..., None], axis=-1)[..., 0]
        rows = lambda v: jnp.sum(v, axis=-1)  # over the chunk's positions, per row
        out = {"ce_sum": rows(jnp.where(x["ce_m"], lse - picked, 0.0)), "ce_count": rows(x["ce_m"]).astype(jnp.float32)}
        if "tk_ids" in x:
            log_q = jnp.take_along_axis(jax.nn.log_softmax(logits / kd.temperature, axis=-1), x["tk_ids"], axis=-1)
            log_p = x["tk_logp"].astype(jnp.float32)
            m = x["kd_m"] & x["tk_valid"]
            w = _weighted(kd, x["w"], log_p, log_q)
            out["kd_sum"] = rows(jnp.where(m, jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * w, 0.0))
            out["kd_count"] = rows(m).astype(jnp.float32)
        elif distill:
            t_logits = jax.lax.stop_gradient(teacher_head(x["th"]).astype(jnp.float32))[..., :vocab]
            t, s = t_logits / kd.temperature, logits / kd.temperature
            if kd.divergence == "forward" and kd.token_weights is None:
                kl, w = forward_kl(t, s), x["w"]
            else:
                log_p, log_q = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
                if kd.divergence == "forward":
                    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
                else:
                    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
                w = _weighted(kd, x["w"], log_p, log_q)
            m = x["kd_m"]
            out["kd_sum"] = rows(jnp.where(m, kl * w, 0.0))
            out["kd_count"] = rows(m).astype(jnp.float32)
        return out

    keys = ("ce_sum", "ce_count") + (("kd_sum", "kd_count") if distill else ())
    if remat:  # keep nothing of the (B, chunk, V) logits for the backward pass; recompute them
        return _sums_recomputed(scored, keys, xs, head, teacher_head)
    return _sums(functools.partial(scored, head, teacher_head), keys, xs)


def _has_scores(x) -> jax.Array:
    return jnp.any(x["ce_m"] | x["kd_m"])


def _sums(scored, keys, xs):
    """Per-row sums over the chunks; a chunk with nothing to score skips the LM head (`lax.cond`)."""
    zero = {k: jnp.zeros(xs["h"].shape[1:2], jnp.float32) for k in keys}

    def body(carry, x):
        out = jax.lax.cond(_has_scores(x), scored, lambda x: zero, x)
        return jax.tree.map(jnp.add, carry, out), None

    return jax.lax.scan(body, zero, xs)[0]


def _sums_recomputed(scored, keys, xs, head, teacher_head):
    """`_sums` with a backward pass written per chunk: each scored chunk's logits are recomputed (nothing of
    them is kept) and the LM head's gradient is summed over the scored chunks only, starting from the first
    one's. They are a prefix (scored positions are sorted first), so the backward loop runs exactly over them
    (an unscored chunk inside them, or chunk 0 of a batch with nothing to score, adds a zero gradient: correct,
    only slower).
    Differentiated as a scan with `jax.checkpoint` instead, every chunk, scored or not, added a (D, V)
    gradient to the running sum (zeros for the skipped ones): 6 % of the CPU SFT step at vocab 32000
    (bench/README.md, issue 17)."""
    s_fn, s_consts = jax.closure_convert(head, xs["h"][0])
    t_fn, t_consts = (None, []) if teacher_head is None else jax.closure_convert(teacher_head, xs["th"][0])

    def chunk(s_consts, x):
        t_head = None if t_fn is None else (lambda h: t_fn(h, *t_consts))
        return scored(lambda h: s_fn(h, *s_consts), t_head, x)

    @jax.custom_vjp
    def sums(s_consts, xs):
        return _sums(functools.partial(chunk, s_consts), keys, xs)

    def fwd(s_consts, xs):
        return sums(s_consts, xs), (s_consts, xs)

    def bwd(res, ct):
        s_consts, xs = res

        def grads(x):  # one chunk's cotangents: (head consts, hidden states)
            _, vjp = jax.vjp(lambda s, h: chunk(s, {**x, "h": h}), s_consts, x["h"])
            return vjp(ct)

        at = lambda i: jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, i, keepdims=False), xs)
        scored_chunks = jax.vmap(_has_scores)(xs)  # a prefix; the loop ends at the last one whatever the order
        n = jnp.max(jnp.where(scored_chunks, jnp.arange(1, scored_chunks.shape[0] + 1), 0))
        d_s, dh0 = grads(at(0))  # always: the head's gradient starts from a chunk's, not from zeros

        def body(i, carry):
            d_s, dh = carry
            g_s, g_h = grads(at(i))
            return jax.tree.map(jnp.add, d_s, g_s), jax.lax.dynamic_update_index_in_dim(dh, g_h, i, 0)

        dh = jnp.zeros_like(xs["h"]).at[0].set(dh0)
        d_s, dh = jax.lax.fori_loop(1, n, body, (d_s, dh))
        return d_s, {k: dh if k == "h" else None for k in xs}

    sums.defvjp(fwd, bwd)
    return sums(s_consts, xs)


def combine(totals: dict[str, jax.Array], kd: KDConfig | None) -> dict[str, jax.Array]:
    """The training loss and its parts from per-row statistics: SFT = CE mean over all supervised tokens;
    KD = per group of `kd.sum_rows` rows (L_CE mean, L_KD sum or mean, mixed), then the mean over the
    groups that hold supervised tokens."""
    tokens = jnp.sum(totals["ce_count"])
    if kd is None or "kd_sum" not in totals:
        ce = jnp.sum(totals["ce_sum"]) / jnp.maximum(tokens, 1.0)
        return {"loss": ce, "loss_ce": ce, "tokens": tokens}
    b = totals["ce_sum"].shape[0]
    g = kd.sum_rows or b
    if b % g:
        raise ValueError(f"a batch of {b} rows does not split into loss groups of kd.sum_rows={g}")
    t = {k: jnp.sum(v.reshape(-1, g), axis=1) for k, v in totals.items()}
    ce = t["ce_sum"] / jnp.maximum(t["ce_count"], 1.0)
    l_kd = t["kd_sum"] if kd.reduction == "sum" else t["kd_sum"] / jnp.maximum(t["kd_count"], 1.0)
    loss = (kd.alpha * l_kd + ce) / (1.0 + kd.alpha) if kd.use_ce else l_kd
    used = (t["ce_count"] + t["kd_count"]) > 0  # groups of filler rows only do not count
    mean = lambda v: jnp.sum(jnp.where(used, v, 0.0)) / jnp.maximum(jnp.sum(used), 1)
    return {"loss": mean(loss), "loss_ce": mean(ce), "loss_kd": mean(l_kd), "tokens": tokens}
