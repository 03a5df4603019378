"""The jitted steps: pure functions (state, [teacher params,] batch) -> (state, metrics).

SFT: shifted next-token cross-entropy, mean over supervised tokens.
Distillation: the teacher's forward (stop-gradient; never donated, no optimizer state) and the
student's forward/backward in one function, loss (alpha * L_KD + L_CE) / (1 + alpha) (losses.py).
Both project hidden states to logits in sequence chunks (losses.chunked_loss).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import optax

from clinkd_jax.models import lora as lora_lib
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


def hidden_and_head(model: Qwen2VL, params, batch, position_key="position_ids", rngs=None):
    hidden = model.apply({"params": params}, **model_inputs(batch, position_key), return_hidden=True,
                         rngs=rngs)["hidden"]
    head = lambda h: model.apply({"params": params}, h, method=Qwen2VL.logits)
    return hidden, head


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """Where a distillation step's teacher signal comes from; static, part of the compiled program.
    "online": `model` runs in the step on the params passed beside the state (`positions` "shared": the student's
    position ids, as released; "own": the batch's teacher_position_ids). "cached": the batch's pseudo-labels
    (`teacher_topk_*`), no teacher forward."""

    kind: str
    model: Qwen2VL | None = None
    positions: str = "shared"

    def __post_init__(self):
        if self.kind not in ("online", "cached") or (self.kind == "online") != (self.model is not None):
            raise ValueError(f"a teacher source is 'online' with a model or 'cached' without, not {self!r}")

    def signal(self, teacher_params, batch: dict) -> losses.Teacher:
        if self.kind == "cached":
            return losses.CachedTopK(batch["teacher_topk_ids"], batch["teacher_topk_logp"],
                                     batch["teacher_topk_valid"])
        key = "position_ids" if self.positions == "shared" else "teacher_position_ids"
        hidden, head = hidden_and_head(self.model, teacher_params, batch, key)
        return losses.OnlineTeacher(jax.lax.stop_gradient(hidden), head)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """How the step's loss is computed (`losses.chunked_loss`): `kd` None is SFT; `chunk` positions per LM-head
    chunk; `backward` "fused" | "autodiff"; `unrolled`: the chunk loop as straight-line code (for XLA's cost
    analysis, `clinkd_jax.aot`)."""

    kd: losses.KDConfig | None = None
    chunk: int = 256
    backward: str = "fused"
    unrolled: bool = False


def train_step(
    state: TrainState,
    teacher_params,
    batch: dict,
    base_params=None,
    *,
    model: Qwen2VL,
    tx: optax.GradientTransformation,
    loss: LossSettings = LossSettings(),
    teacher: TeacherSource | None = None,
    lr_schedule=None,
    frozen: tuple[str, ...] = (),
    dropout_seed: int | None = None,
):
    """One optimizer micro-step: SFT without a `teacher`, ClinKD distillation (`loss.kd`) from its signal with
    one. `teacher_params`: the online teacher's (None otherwise). `base_params`: a LoRA model's frozen base, whose
    adapters are `state.params` (None: the state holds the whole model). `dropout_seed`: the adapters' dropout
    draws from (seed, step)."""
    if (teacher is None) != (loss.kd is None):
        raise ValueError("distillation takes loss.kd and a teacher source; SFT neither")
    signal = None if teacher is None else teacher.signal(teacher_params, batch)
    labels = state_lib.trainable_labels(state.params, frozen) if frozen else None

    def loss_fn(params):
        if labels is not None:  # no backward pass at all through frozen parts (the vision tower)
            params = jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, labels)
        if base_params is not None:
            params = lora_lib.merge(base_params, params)
        rngs = None if dropout_seed is None else {"dropout": jax.random.fold_in(jax.random.key(dropout_seed),
                                                                                state.step)}
        hidden, head = hidden_and_head(model, params, batch, rngs=rngs)
        out = losses.chunked_loss(hidden, head, batch["labels"], kd=loss.kd, backward=loss.backward, chunk=loss.chunk,
                                  teacher=signal, unrolled=loss.unrolled)
        return out["loss"], out

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(state_sh, teacher_sh, batch_sh, base_sh=None, **kw):
    """jit with shardings; the train state is donated, the teacher and a LoRA base (`base_sh`: the step takes
    it as a 4th argument) never are."""
    return jax.jit(
        functools.partial(train_step, **kw),
        in_shardings=(state_sh, teacher_sh, batch_sh) + (() if base_sh is None else (base_sh,)),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )


def eval_loss(params, batch, *, model: Qwen2VL, chunk: int = 256):
    hidden, head = hidden_and_head(model, params, batch)
    return losses.combine(losses.token_losses(hidden, head, batch["labels"], chunk=chunk), None)
