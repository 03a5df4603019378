"""The jitted steps: pure functions (state, [teacher params,] batch) -> (state, metrics).

SFT: shifted next-token cross-entropy, mean over supervised tokens.
Distillation: the teacher's forward (stop-gradient; never donated, no optimizer state) and the
student's forward/backward in one function, loss (alpha * L_KD + L_CE) / (1 + alpha) (losses.py).
Both project hidden states to logits in sequence chunks (losses.chunked_loss).
"""

from __future__ import annotations

import functools

import jax
import optax

from clinkd_jax.models.qwen2vl import Qwen2VL
from clinkd_jax.train import losses
from clinkd_jax.train import state as state_lib
from clinkd_jax.train.state import TrainState

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "vision_position_ids",
                "vision_segment_ids")


def model_inputs(batch, position_key: str = "position_ids") -> dict:
    out = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    out["position_ids"] = batch[position_key]
    return out


def hidden_and_head(model: Qwen2VL, params, batch, position_key="position_ids"):
    hidden = model.apply({"params": params}, **model_inputs(batch, position_key), return_hidden=True)["hidden"]
    head = lambda h: model.apply({"params": params}, h, method=Qwen2VL.logits)
    return hidden, head


def train_step(
    state: TrainState,
    teacher_params,
    batch: dict,
    *,
    model: Qwen2VL,
    tx: optax.GradientTransformation,
    teacher: Qwen2VL | None = None,
    kd: losses.KDConfig | None = None,
    chunk: int = 256,
    teacher_positions: str = "shared",
    lr_schedule=None,
    frozen: tuple[str, ...] = (),
    loss_backward: str = "fused",
    loss_unrolled: bool = False,
):
    """One optimizer micro-step. `teacher_params=None` and `kd=None` is plain SFT; `kd` with cached
    pseudo-labels in the batch (`teacher_topk_*`) distils without a teacher forward. `loss_unrolled`: the loss's
    chunk loop as straight-line code (`losses.chunked_loss`; for XLA's cost analysis, `clinkd_jax.aot`)."""
    cached = kd is not None and "teacher_topk_ids" in batch
    distill = teacher_params is not None or cached
    topk = (batch["teacher_topk_ids"], batch["teacher_topk_logp"], batch["teacher_topk_valid"]) if cached else None
    if teacher_params is not None:
        key = "position_ids" if teacher_positions == "shared" else "teacher_position_ids"
        t_hidden, t_head = hidden_and_head(teacher, teacher_params, batch, key)
        t_hidden = jax.lax.stop_gradient(t_hidden)
    else:
        t_hidden = t_head = None

    labels = state_lib.trainable_labels(state.params, frozen) if frozen else None

    def loss_fn(params):
        if labels is not None:  # no backward pass at all through frozen parts (the vision tower)
            params = jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, labels)
        hidden, head = hidden_and_head(model, params, batch)
        out = losses.chunked_loss(hidden, head, batch["labels"], kd=kd if distill else None, backward=loss_backward,
                                  chunk=chunk, teacher_hidden_bld=t_hidden, teacher_head=t_head, teacher_topk=topk,
                                  unrolled=loss_unrolled)
        return out["loss"], out

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(state_sh, teacher_sh, batch_sh, **kw):
    """jit with shardings; the train state is donated, the teacher never is."""
    return jax.jit(
        functools.partial(train_step, **kw),
        in_shardings=(state_sh, teacher_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def eval_loss(params, batch, *, model: Qwen2VL, chunk: int = 256):
    hidden, head = hidden_and_head(model, params, batch)
    return losses.combine(losses.token_losses(hidden, head, batch["labels"], chunk=chunk), None)
