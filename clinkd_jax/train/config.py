"""Run-config validation: every inconsistency is reported before anything is compiled, naming the field."""

from __future__ import annotations

import jax
import numpy as np

from clinkd_jax import settings
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.layers import REMAT_POLICIES
from clinkd_jax.train import losses


def kd_config(c) -> losses.KDConfig:
    fields = {k: v for k, v in c.kd.to_dict().items() if k in losses.KDConfig.__dataclass_fields__}
    return losses.KDConfig(**{**fields, "token_weights": losses.resolve_token_weights(c.kd.token_weights)})


def pseudo_label_switches(c) -> None:
    """What a pseudo-label store cannot represent (it holds the teacher's top-k under the student's
    position ids), refused for the writer and for a run reading one."""
    if c.kd.divergence != "forward":
        raise ConfigError(f"kd.divergence={c.kd.divergence!r}: pseudo-labels hold the teacher's top-k only; the "
                          "reverse KL needs the teacher's whole distribution (use online distillation)")
    if c.teacher.positions != "shared":
        raise ConfigError(f"teacher.positions={c.teacher.positions!r}: pseudo-labels are computed with the "
                          "student's position ids (teacher.positions=shared)")
    if c.kd.top_k < 1:
        raise ConfigError(f"kd.top_k={c.kd.top_k} must be >= 1")


# The allowed values of the settings a training stage reads, listed once; a bad one is named with these.
CHOICES = {
    "teacher.positions": ("shared", "own"),
    "model.remat": REMAT_POLICIES,
    "optim.schedule": ("cosine", "constant"),
    "train.loss_backward": losses.LOSS_BACKWARDS,
}
DTYPES = ("model.dtype", "model.param_dtype", "teacher.dtype", "checkpoint.export_dtype", "optim.mu_dtype")


def validate(c) -> None:
    """A training stage's config: the mesh on this host's devices, its settings (`check_settings`), then the files
    and checkpoints it names (`settings.check_files`)."""
    check_devices(c, jax.device_count())
    check_settings(c)
    settings.check_files(c, teacher="teacher", training=True)


def check_settings(c) -> None:
    """Every setting on its own and against the others; reads no file (`clinkd_jax.aot` checks with this)."""
    if c.stage not in ("sft", "kd", "rct"):
        raise ConfigError(f"stage={c.stage!r} is not one of ('sft', 'kd', 'rct', 'eval')")
    if c.stage == "kd":
        try:
            kd_config(c)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    _rct_in_run(c)
    _data_shapes(c)
    if c.optim.grad_accum < 1:
        raise ConfigError(f"optim.grad_accum={c.optim.grad_accum} must be >= 1")
    if len(c.mesh.shape) != 3:
        raise ConfigError(f"mesh.shape={tuple(c.mesh.shape)} must have 3 axes (data, fsdp, tensor)")
    if c.train.loss_chunk <= 0:
        raise ConfigError(f"train.loss_chunk={c.train.loss_chunk} must be > 0")
    cached = c.stage == "kd" and bool(c.kd.pseudo_labels)
    if cached:
        pseudo_label_switches(c)
    settings.check(c, CHOICES, DTYPES, teacher_required=c.stage == "kd" and not cached)


def _rct_in_run(c) -> None:
    if c.rct.every_steps > 0:
        if c.stage != "sft":
            raise ConfigError(f"rct.every_steps={c.rct.every_steps}: RCT rounds run inside SFT (stage 'sft'), "
                              f"not {c.stage!r}")
        if c.train.steps <= 0:
            raise ConfigError("rct.every_steps needs train.steps > 0 (rounds change the pool, so epochs do not say "
                              "when to stop)")
        if c.rct.rounds < 1:
            raise ConfigError(f"rct.rounds={c.rct.rounds} must be >= 1")


def _data_shapes(c) -> None:
    d = c.data
    for key in ("text_buckets", "patch_buckets"):
        b = list(d[key])
        if not b or b != sorted(set(b)) or b[0] <= 0:
            raise ConfigError(f"data.{key}={tuple(b)} must be increasing positive lengths")
    if any(n % 4 for n in d.patch_buckets):
        raise ConfigError(f"data.patch_buckets={tuple(d.patch_buckets)} must be multiples of 4 (2x2 merge)")
    if d.batch_size <= 0:
        raise ConfigError(f"data.batch_size={d.batch_size} must be > 0")
    if c.stage == "kd" and c.kd.sum_rows and d.batch_size % c.kd.sum_rows:
        raise ConfigError(f"kd.sum_rows={c.kd.sum_rows} must divide data.batch_size={d.batch_size} (loss groups of "
                          "whole rows: the released per-device micro-batch)")
    if len(d.mrope_gaps) != 2 or min(d.mrope_gaps) < 1:
        raise ConfigError(f"data.mrope_gaps={tuple(d.mrope_gaps)} must be two gaps >= 1")


def check_devices(c, n: int) -> None:
    """config.mesh.shape fits `n` devices."""
    shape = list(c.mesh.shape)
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) > 1 or (shape.count(-1) == 0 and known > n) or (shape.count(-1) == 1 and n % known):
        raise ConfigError(f"mesh.shape={tuple(shape)} does not fit the {n} available devices")
