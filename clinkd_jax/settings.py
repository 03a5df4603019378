"""Checks of the run-config fields every model-running stage reads (the model's source, its vocabulary, how data
files are read, the runtime switches), in two parts: `check` reads no file, so `clinkd_jax.aot` checks a paper
config on a machine without its data or checkpoints; `check_files` checks what the settings name on disk.
Each stage adds its own sections (`train.config`, `eval.run.validate`). Allowed values are listed once (CHOICES)."""

from __future__ import annotations

import logging
import os

import numpy as np

from clinkd_jax.data import demo, text
from clinkd_jax.data import pseudo_labels as pl_store
from clinkd_jax.data.markup import BOX_FORMATS, BOX_MARKUPS
from clinkd_jax.model_source import ModelSource, same_tokenizer
from clinkd_jax.models.attention import IMPLS
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import ATTENTION_LOOPS, DECODE_LAYERS, Qwen2VL

log = logging.getLogger("clinkd_jax.setup")
CHOICES = {
    "data.format": ("medgrit", "sharegpt", "demo"),
    "data.extra_mode": ("append", "replace"),
    "model.attention": IMPLS,
    "data.box_markup": BOX_MARKUPS,
    "data.box_format": ("auto", *BOX_FORMATS),
    "data.demo_layout": demo.LAYOUTS,
}
# runtime.*: how the model runs here (never what it computes), with defaults and allowed values. They used to be
# model.* fields; a value still set there is read while runtime.* keeps its default (`runtime`), with a warning.
RUNTIME_DEFAULTS = {"scan_unroll": 1, "attention_loop": "auto", "vision_query_block": 0, "decode_layers": "auto"}
RUNTIME_CHOICES = {"attention_loop": ATTENTION_LOOPS, "decode_layers": DECODE_LAYERS}
_WARNED: set[str] = set()


def runtime_field(c, key: str) -> tuple[str, object]:
    """(where it is set, value) of runtime.<key>: runtime.*, else the deprecated model.* field when only it is set."""
    default, new = RUNTIME_DEFAULTS[key], c.runtime[key]
    old = c.model.get(key, default)
    if new == default and old != default:
        return f"model.{key}", old
    return f"runtime.{key}", new


def runtime(c) -> dict:
    """The runtime settings the model is built with ({field: value})."""
    return {k: runtime_field(c, k)[1] for k in RUNTIME_DEFAULTS}


def model_module(c, cfg, dtype: str | None = None, **training) -> Qwen2VL:
    """The module for geometry `cfg` as run config `c` sets it up: its compute dtype and attention kernel, and how
    it runs here (runtime.*); `training` adds param_dtype / remat for the model being trained."""
    return Qwen2VL(cfg, dtype=dtype or c.model.dtype, attention_impl=c.model.attention, **runtime(c), **training)


def check_runtime(c) -> None:
    for key, default in RUNTIME_DEFAULTS.items():
        old, new = c.model.get(key, default), c.runtime[key]
        if old != default and new != default and old != new:
            raise ConfigError(f"model.{key}={old!r} and runtime.{key}={new!r} disagree; the field moved to "
                              f"runtime.{key}: set it there only")
        if old != default and f"model.{key}" not in _WARNED:
            _WARNED.add(f"model.{key}")
            log.warning("model.%s is now runtime.%s; %r is used (set runtime.%s instead: model.%s will go)", key,
                        key, old, key, key)
    for key, allowed in RUNTIME_CHOICES.items():
        field, value = runtime_field(c, key)
        if value not in allowed:
            raise ConfigError(f"{field}={value!r} is not one of {allowed}")
    field, value = runtime_field(c, "scan_unroll")
    if value < 1:
        raise ConfigError(f"{field}={value} must be >= 1")
    field, value = runtime_field(c, "vision_query_block")
    if value < 0:
        raise ConfigError(f"{field}={value} must be 0 (all rows) or a row count")


def check_choices(c, choices: dict) -> None:
    """Each field of `choices` ("section.field": allowed values) holds one of its allowed values."""
    for field, allowed in choices.items():
        section, key = field.split(".")
        if c[section][key] not in allowed:
            raise ConfigError(f"{field}={c[section][key]!r} is not one of {allowed}")


def check(c, choices: dict | None = None, dtypes: tuple = (), teacher_required: bool = False) -> None:
    """The shared fields on their own and against each other, and a stage's own `choices` ("section.field":
    allowed values) and `dtypes` (fields naming a dtype; "" allowed for optim.mu_dtype); reads no file."""
    check_choices(c, {**CHOICES, **(choices or {})})
    for field in dtypes:
        section, key = field.split(".")
        if field == "optim.mu_dtype" and not c.optim.mu_dtype:
            continue  # "" = the parameters' dtype
        try:
            np.dtype(c[section][key])
        except TypeError:
            raise ConfigError(f"{field}={c[section][key]!r} is not a dtype") from None
    if c.model.compact_vocab and is_preset(c) and c.checkpoint.export_hf:  # a checkpoint keeps its vocabulary
        raise ConfigError("checkpoint.export_hf: a compact-vocabulary model cannot be exported to the Hugging "
                          "Face layout (full vocabulary); unset model.compact_vocab or export_hf")
    template = c.data.chat_template
    if template and template not in text.TEMPLATES and "{%" not in template and "{{" not in template:
        raise ConfigError(f"data.chat_template={template!r} is neither a built-in template "
                          f"({sorted(text.TEMPLATES)}), '' (the tokenizer's own) nor a Jinja template")
    exts = tuple(c.data.image_ext)
    if not exts or not all(isinstance(e, str) and e.startswith(".") for e in exts):
        raise ConfigError(f"data.image_ext={exts} must be file extensions such as ('.png', '.dcm')")
    check_nothing_ignored(c)
    check_runtime(c)
    ModelSource.of(c, "model")
    ModelSource.of(c, "teacher", required=teacher_required)


def check_files(c, teacher: str = "", training: bool = False) -> None:
    """What the fields name on disk. Always: the model's checkpoint, a compact vocabulary's file. With `teacher`
    (its name in messages): the teacher's checkpoint, sharing the model's tokenizer. With `training`: the training
    and extra files, the image folder and a KD pseudo-label store (written with this run's mask and temperature)."""
    vocab = c.model.compact_vocab
    if vocab and is_preset(c) and vocab != "data" and not os.path.isfile(vocab):
        raise ConfigError(f"model.compact_vocab={vocab!r} is neither 'data' nor a JSON file of token ids")
    model = ModelSource.of(c, "model")
    model.check_files()
    other = ModelSource.of(c, "teacher", required=False) if teacher else None
    if other:
        other.check_files()
        same_tokenizer(model, other, teacher)
    if not training:
        return
    d = c.data
    for f in d.extra_files:
        if not os.path.isfile(f):
            raise ConfigError(f"data.extra_files: {f} does not exist")
    if d.format != "demo":
        files = [f for f in d.train_files if f]
        if not files:
            raise ConfigError("data.train_files is empty")
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"data.train_files: {f} does not exist")
        if not os.path.isdir(d.image_dir):
            raise ConfigError(f"data.image_dir={d.image_dir!r} is not a directory")
    if c.stage == "kd" and c.kd.pseudo_labels:
        try:
            meta = pl_store.read_meta(c.kd.pseudo_labels)
        except FileNotFoundError as e:
            raise ConfigError(f"kd.pseudo_labels: {e}") from None
        for field, mine in (("mask", c.kd.mask), ("temperature", c.kd.temperature)):
            if meta.get(field) != mine:
                raise ConfigError(f"kd.{field}={mine!r} but the pseudo-labels in {c.kd.pseudo_labels} were written "
                                  f"with kd.{field}={meta.get(field)!r}; write them again or use the same setting")


def is_preset(c) -> bool:
    """Whether the model is built from a preset (model.compact_vocab applies to one only)."""
    src = ModelSource.of(c, "model", required=False)
    return src is not None and src.kind == "preset"


def check_nothing_ignored(c) -> None:
    """A setting that would have no effect in the mode chosen is refused by name, not silently ignored."""
    d, demo_fields = c.data, {"train_files": not any(c.data.train_files), "image_dir": not c.data.image_dir,
                              "box_format": c.data.box_format == "auto"}
    for field, unset in demo_fields.items():
        if d.format == "demo" and not unset:
            raise ConfigError(f"data.{field}={d[field]!r} has no effect under data.format='demo' (the generated demo "
                              "set is read); set data.format=medgrit (or sharegpt) to train on your own files")
    if d.format != "demo" and d.demo_dir:
        raise ConfigError(f"data.demo_dir={d.demo_dir!r} has no effect under data.format={d.format!r}")
    if d.format != "demo" and d.demo_layout != "random":
        raise ConfigError(f"data.demo_layout={d.demo_layout!r} has no effect under data.format={d.format!r}")
    if d.extra_mode != "append" and not d.extra_files:
        raise ConfigError(f"data.extra_mode={d.extra_mode!r} has no effect without data.extra_files")
    if c.kd.pseudo_labels and c.stage != "kd":
        raise ConfigError(f"kd.pseudo_labels={c.kd.pseudo_labels!r} has no effect in stage {c.stage!r} (it replaces "
                          "the teacher in stage 'kd')")
    if c.eval.files and c.eval.data_dir:
        raise ConfigError(f"eval.files and eval.data_dir={c.eval.data_dir!r} are both set: eval.files is read and "
                          "eval.data_dir would be ignored; set one")
