"""Train state and optimizer: AdamW with warmup + cosine, global-norm clipping, gradient accumulation,
and freezing by parameter path (frozen leaves get no optimizer state and no update).

ClinKD's default (clinkd-spec §1.4): vision tower and merger frozen, the LLM trained.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clinkd_jax import sharding
from clinkd_jax.models.qwen2vl import Qwen2VL, abstract_params

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 5e-5
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 0
    total_steps: int = 1000  # optimizer updates, for the schedule
    end_lr_ratio: float = 0.0  # cosine ends at learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer update
    mu_dtype: str = ""  # AdamW first moment: "" = the parameters' dtype; "bfloat16" halves its memory
    frozen: tuple[str, ...] = ("visual/.*",)  # regexes over "a/b/c" parameter paths


@flax.struct.dataclass
class TrainState:
    """A plain pytree; the optimizer (`tx`) is passed to the step, not stored."""

    step: jax.Array  # micro-steps taken
    params: Any
    opt_state: Any


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_labels(params, frozen: tuple[str, ...]):
    pats = [re.compile(p) for p in frozen]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(p.fullmatch(path_str(path)) for p in pats) else "trainable", params
    )


def schedule(cfg: OptimConfig):
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)),
                                     optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if cfg.warmup_steps else cfg.learning_rate, cfg.learning_rate, cfg.warmup_steps,
            max(cfg.total_steps, cfg.warmup_steps + 1), cfg.learning_rate * cfg.end_lr_ratio,
        )
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of {SCHEDULES}")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all gradients by min(1, max_norm / global norm), as `optax.clip_by_global_norm` (same empty state)
    and `torch.nn.utils.clip_grad_norm_` do, but as one scalar times each gradient: optax divides every element
    by the norm, and XLA:CPU wrote those quotients out as a second copy of every gradient for the two AdamW
    moments to read: one more pass over the parameters per step (bench/history.md)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW as `cfg` sets it, on whatever parameter tree it is given: leaves whose path matches `cfg.frozen`
    get no optimizer state and no update (labelled when the state is made, so no model is needed here)."""
    inner = [clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    inner.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mu_dtype=cfg.mu_dtype or None))

    def labels(params):
        out = trainable_labels(params, cfg.frozen)
        leaves = jax.tree.leaves(out)  # none for optax's stand-in when it maps the state's structure
        if leaves and "trainable" not in leaves:
            raise ValueError(f"optim.frozen={cfg.frozen} freezes every parameter")
        return out

    tx = optax.multi_transform({"trainable": optax.chain(*inner), "frozen": optax.set_to_zero()}, labels)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


def unboxed(params):
    """A boxed (logically named) abstract parameter tree -> its ShapeDtypeStructs."""
    return jax.tree.map(lambda b: b.value, params, is_leaf=lambda b: isinstance(b, flax.linen.Partitioned))


def param_shapes(model: Qwen2VL):
    return unboxed(abstract_params(model))


def create(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(params, tx) -> TrainState:
    """The state of trained `params` (a boxed abstract tree: `abstract_params(model)`, or a LoRA model's adapters)
    as ShapeDtypeStructs."""
    return jax.eval_shape(lambda: create(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), unboxed(params)), tx))


def state_shardings(params, tx, mesh, rules=None) -> TrainState:
    """NamedShardings for every leaf of the TrainState of trained `params` (as `abstract_state`): params by their
    logical names, optimizer moments like their params, counters replicated."""
    abstract = abstract_state(params, tx)
    p_sh = sharding.tree_shardings(params, mesh, rules or sharding.DEFAULT_RULES)
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s, abstract.opt_state, p_sh,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh)
