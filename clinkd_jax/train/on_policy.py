"""On-policy distillation (GKD: Agarwal et al., ICLR 2024) and sequence-level KD, inside the training step.

On a step drawn for it (`drawn`: kd.on_policy_fraction of the steps, from the seed and the step), the student
answers each row's question itself, and the teacher judges every token of that answer in the same step:

    each row is cut before one of its answers (`prompts`; drawn per row, so a conversation's every exchange is met
        over the epochs): the prompt is the conversation up to that question, as the chat template renders it for
        generation (system, image, the earlier exchanges as the data give them, the question, "assistant\n")
    the prompt is moved to the end of the row's L slots (`prompts`): the left-padded layout generation decodes from
    the jitted sampler writes n = kd.max_new_tokens tokens after it, one key per row (`row_keys`)
    the row trained on is those L + n slots (`answered`): the prompt as it was (the same tokens, pixels and
        M-RoPE / MCG-RoPE positions, each model's own gaps), then the answer at the positions that follow the
        prompt's largest; labels are the answer through its first stop token, padding after it (no attention,
        no loss)
    student and teacher read that same row; the loss is kd.divergence alone over the answer's tokens (the
        "aligned" mask: at the positions each token was drawn from), no cross-entropy on the student's own samples.

kd.seq_kd: the other steps train on the teacher's sampled answers instead of the data's (sequence-level KD), with
ClinKD's loss as configured.

A sample depends on the seed, the step and the record only, not on the rows beside it, the mesh or the number of
processes; a resumed run draws what the uninterrupted run drew. Shapes are static: a (text, patch) bucket compiles
the sampled step once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.train import steps
from clinkd_jax.train.losses import IGNORE

POSITION_KEYS = ("position_ids", "teacher_position_ids")  # each model's M-RoPE ids, continued for the answer
_STREAM = 0x6B64  # sampling's own stream of the run's seed (the model's init uses the seed itself)


def drawn(seed: int, step: int, fraction: float) -> bool:
    """Whether micro-step `step` (the train state's step before it) is on-policy: a draw from (seed, step), the same
    on every host and after a resume."""
    if fraction <= 0 or fraction >= 1:
        return fraction >= 1
    return bool(np.random.default_rng([seed, step, _STREAM]).random() < fraction)


def row_keys(seed: int, step: jax.Array, record_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two (B,) keys per row from the seed, the step and the row's record (the batch's `record_index`): which answer
    of the conversation is asked for (`prompts`), and the answer's tokens (`generate`)."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)
    keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(base, r)))(record_index.astype(jnp.uint32))
    return keys[:, 0], keys[:, 1]


def next_offsets(pos_3bl: jax.Array) -> jax.Array:
    """(B,) offsets such that the token at slot c after the L slots of a left-padded prompt has position c + offset:
    one past the prompt's largest position (padding holds 0)."""
    return jnp.max(pos_3bl, axis=(0, 2)) + 1 - pos_3bl.shape[-1]


def prompts(batch: dict, pad_id: int, keys: jax.Array) -> dict:
    """Each row's prompt moved to the end of its L slots, with its positions and the row's images: the row's tokens
    before one of its answers (the supervised spans), drawn with the row's key; a row with no answer (filler) is
    left empty."""
    ids, supervised = batch["input_ids"], batch["labels"] != IGNORE
    starts = supervised & ~jnp.pad(supervised, ((0, 0), (1, 0)))[:, :-1]  # each answer's first token
    answers = jnp.sum(starts, axis=1)
    pick = jax.vmap(lambda k, n: jax.random.randint(k, (), 0, jnp.maximum(n, 1)))(keys, answers)
    chosen = starts & (jnp.cumsum(starts, axis=1) == pick[:, None] + 1)
    length = jnp.where(answers > 0, jnp.argmax(chosen, axis=1), 0)
    slot = jnp.arange(ids.shape[1])
    src = (slot[None] - (ids.shape[1] - length)[:, None]) % ids.shape[1]  # slot c <- token c - (L - length)
    keep = slot[None] >= ids.shape[1] - length[:, None]
    out = {k: batch[k] for k in gen_lib.VISION_KEYS if k in batch}
    out["input_ids"] = jnp.where(keep, jnp.take_along_axis(ids, src, axis=1), pad_id)
    out["attention_mask"] = keep.astype(jnp.int32)
    for k in POSITION_KEYS:
        if k in batch:
            moved = jnp.take_along_axis(batch[k], jnp.broadcast_to(src, batch[k].shape), axis=2)
            out[k] = jnp.where(keep[None], moved, 0)
    return out


def answered(prompt: dict, tokens: jax.Array, sampling: gen_lib.SamplingConfig, image_token_id: int) -> dict:
    """The row trained on: the prompt's L slots, then the n sampled tokens; labels on the answer through its first
    stop token (kept: the model learns where to stop, as its SFT labels teach it), nothing after it. A sampled
    <|image_pad|> ends the answer before it: in a forward pass it would be read as an image's slot."""
    b, length = prompt["input_ids"].shape
    n = tokens.shape[1]
    is_stop = jnp.isin(tokens, jnp.asarray(sampling.stop_token_ids, jnp.int32))
    before = lambda x: jnp.cumsum(x, axis=1) - x  # how many came before each token
    ended = (before(is_stop) > 0) | (jnp.cumsum(tokens == image_token_id, axis=1) > 0)
    answer = ~ended & prompt["attention_mask"].astype(bool).any(axis=1, keepdims=True)
    out = dict(prompt)
    out["input_ids"] = jnp.concatenate([prompt["input_ids"], jnp.where(answer, tokens, sampling.pad_token_id)], 1)
    out["attention_mask"] = jnp.concatenate([prompt["attention_mask"], answer.astype(jnp.int32)], 1)
    out["labels"] = jnp.concatenate([jnp.full((b, length), IGNORE, jnp.int32), jnp.where(answer, tokens, IGNORE)], 1)
    slots = length + jnp.arange(n, dtype=jnp.int32)
    for k in POSITION_KEYS:
        if k in prompt:
            after = next_offsets(prompt[k])[:, None] + slots[None]
            out[k] = jnp.concatenate([prompt[k], jnp.broadcast_to(after[None], (3, b, n))], axis=2)
    return out


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Who writes a sampled step's answers ("student": on-policy; "teacher": kd.seq_kd) and how; static."""

    by: str
    sampling: gen_lib.SamplingConfig
    seed: int

    def __post_init__(self):
        if self.by not in ("student", "teacher"):
            raise ValueError(f"answers are sampled by the student or the teacher, not {self.by!r}")


def generation_batch(prompt: dict, position_key: str) -> dict:
    """What the sampler reads of `prompt`, on the positions of the model that samples."""
    out = {k: prompt[k] for k in ("input_ids", "attention_mask", *gen_lib.VISION_KEYS) if k in prompt}
    return {**out, "position_ids": prompt[position_key], "decode_offsets": next_offsets(prompt[position_key])}


def sampled_step(state, teacher_params, batch: dict, *, sampler: Sampler, teacher: steps.TeacherSource, **train):
    """One micro-step on answers sampled in it: the batch's prompts answered by `sampler.by`, then the train step
    (`steps.train_step` with `train`) on the answered rows; metrics gain the answers' mean length."""
    choose, draw = row_keys(sampler.seed, state.step, batch["record_index"])
    prompt = prompts(batch, sampler.sampling.pad_token_id, choose)
    if sampler.by == "student":
        model, params, key = train["model"], state.params, "position_ids"
    else:
        model, params = teacher.model, teacher_params
        key = "position_ids" if teacher.positions == "shared" else "teacher_position_ids"
    tokens = gen_lib.generate(jax.lax.stop_gradient(params), generation_batch(prompt, key), draw, model=model,
                              sampling=sampler.sampling)
    rows = answered(prompt, tokens, sampler.sampling, train["model"].cfg.image_token_id)
    state, metrics = steps.train_step(state, teacher_params, rows, teacher=teacher, **train)
    asked = jnp.maximum(jnp.sum(prompt["attention_mask"].any(axis=1)), 1)
    metrics["answer_tokens"] = jnp.sum(rows["labels"] != IGNORE) / asked
    return state, metrics


def jit_sampled_step(state_sh, teacher_sh, **kw):
    """jit with shardings; the train state is donated, the teacher never is."""
    return jax.jit(functools.partial(sampled_step, **kw), in_shardings=(state_sh, teacher_sh, None),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
