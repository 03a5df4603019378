"""Run-config validation: every inconsistency is reported before anything is compiled, naming the field."""

from __future__ import annotations

import os

import jax
import numpy as np

from clinkd_jax.data import pseudo_labels as pl_store
from clinkd_jax.models.attention import IMPLS
from clinkd_jax.models.layers import REMAT_POLICIES
from clinkd_jax.run_setup import ConfigError, check_common, check_same_tokenizer, check_source
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


def _pseudo_labels(c) -> None:
    """A KD run reading a store: it exists and was written with this run's mask and temperature."""
    try:
        meta = pl_store.read_meta(c.kd.pseudo_labels)
    except FileNotFoundError as e:
        raise ConfigError(f"kd.pseudo_labels: {e}") from None
    pseudo_label_switches(c)
    for field, mine in (("mask", c.kd.mask), ("temperature", c.kd.temperature)):
        if meta.get(field) != mine:
            raise ConfigError(f"kd.{field}={mine!r} but the pseudo-labels in {c.kd.pseudo_labels} were written "
                              f"with kd.{field}={meta.get(field)!r}; write them again or use the same setting")


# The allowed values of the settings a training stage reads, listed once; a bad one is named with these.
CHOICES = {
    "data.extra_mode": ("append", "replace"),
    "data.format": ("medgrit", "sharegpt", "demo"),
    "teacher.positions": ("shared", "own"),
    "model.attention": IMPLS,
    "model.remat": REMAT_POLICIES,
    "optim.schedule": ("cosine", "constant"),
    "train.loss_backward": losses.LOSS_BACKWARDS,
}
DTYPES = ("model.dtype", "model.param_dtype", "teacher.dtype", "checkpoint.export_dtype", "optim.mu_dtype")


def validate(c) -> None:
    """A training stage's config: its settings (`check_settings`), then the files and checkpoints it names."""
    check_settings(c)
    check_files(c)


def check_settings(c) -> None:
    """Every setting on its own and against the others; reads no file."""
    if c.stage not in ("sft", "kd", "rct"):
        raise ConfigError(f"stage={c.stage!r} is not one of ('sft', 'kd', 'rct', 'eval')")
    for field, allowed in CHOICES.items():
        section, key = field.split(".")
        if c[section][key] not in allowed:
            raise ConfigError(f"{field}={c[section][key]!r} is not one of {allowed}")
    for field in DTYPES:
        section, key = field.split(".")
        if field == "optim.mu_dtype" and not c.optim.mu_dtype:
            continue  # "" = the parameters' dtype
        try:
            np.dtype(c[section][key])
        except TypeError:
            raise ConfigError(f"{field}={c[section][key]!r} is not a dtype") from None
    if c.stage == "kd":
        try:
            kd_config(c)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    _rct_in_run(c)
    _data_shapes(c)
    if c.optim.grad_accum < 1:
        raise ConfigError(f"optim.grad_accum={c.optim.grad_accum} must be >= 1")
    _mesh(c)
    if c.train.loss_chunk <= 0:
        raise ConfigError(f"train.loss_chunk={c.train.loss_chunk} must be > 0")


def check_files(c) -> None:
    """What the settings name on disk: training and extra files, images, model and teacher sources, the
    tokenizer, a pseudo-label store."""
    for f in c.data.extra_files:
        if not os.path.isfile(f):
            raise ConfigError(f"data.extra_files: {f} does not exist")
    check_common(c)
    cached = c.stage == "kd" and bool(c.kd.pseudo_labels)
    check_source(c, "teacher", required=c.stage == "kd" and not cached)
    check_same_tokenizer(c, "teacher")
    if cached:
        _pseudo_labels(c)
    d = c.data
    if d.format != "demo":
        files = [f for f in d.train_files if f]
        if not files:
            raise ConfigError("data.train_files is empty")
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"data.train_files: {f} does not exist")
        if not os.path.isdir(d.image_dir):
            raise ConfigError(f"data.image_dir={d.image_dir!r} is not a directory")


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


def _mesh(c) -> None:
    shape = list(c.mesh.shape)
    if len(shape) != 3:
        raise ConfigError(f"mesh.shape={tuple(shape)} must have 3 axes (data, fsdp, tensor)")
    known = int(np.prod([s for s in shape if s != -1]))
    n = jax.device_count()
    if shape.count(-1) > 1 or (shape.count(-1) == 0 and known > n) or (shape.count(-1) == 1 and n % known):
        raise ConfigError(f"mesh.shape={tuple(shape)} does not fit the {n} available devices")
