"""The run config's shared sections, declared with their defaults and what each field accepts, and their checks.

A section is a frozen dataclass: each field is a config field with its default, a comment saying what it does, and,
where the values are few or bounded, what it accepts in its annotation (`Literal[...]` of the allowed values,
`Annotated[..., AtLeast(n)]`, `DTYPE`), so the allowed values are listed once, beside the field, and checked by
`check_section`. configs/base.py builds a run config from the sections (`defaults`); each stage checks the sections
it reads: the shared ones here (model, teacher, data, runtime, mesh), a training stage's in `train.config`, an
evaluation's in `eval.config`.

The checks come in two parts: `check` reads no file, so `clinkd_jax.aot` checks a paper config on a machine without
its data or checkpoints; `check_files` checks what the settings name on disk."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from typing import Annotated, Literal

import numpy as np
from ml_collections import ConfigDict

from clinkd_jax.data import pseudo_labels as pl_store
from clinkd_jax.data import text
from clinkd_jax.data.demo import LAYOUTS
from clinkd_jax.data.markup import BOX_FORMATS, BOX_MARKUPS
from clinkd_jax.model_source import ModelSource, same_tokenizer
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models import quant
from clinkd_jax.models.attention import IMPLS
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.layers import REMAT_POLICIES
from clinkd_jax.models.qwen2vl import ATTENTION_LOOPS, DECODE_LAYERS, Qwen2VL

log = logging.getLogger("clinkd_jax.setup")


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A number field's lower bound (`says`: the message's own words after the value)."""

    low: int
    says: str = ""

    def __call__(self, field: str, value) -> None:
        if value < self.low:
            raise ConfigError(f"{field}={value} {self.says or f'must be >= {self.low}'}")


@dataclasses.dataclass(frozen=True)
class Within:
    """A number field's closed range."""

    low: float
    high: float

    def __call__(self, field: str, value) -> None:
        if not self.low <= value <= self.high:
            raise ConfigError(f"{field}={value} must be in [{self.low}, {self.high}]")


@dataclasses.dataclass(frozen=True)
class IsDType:
    empty_ok: bool = False  # "" = another field's dtype

    def __call__(self, field: str, value) -> None:
        if self.empty_ok and value == "":
            return
        try:
            np.dtype(value)
        except TypeError:
            raise ConfigError(f"{field}={value!r} is not a dtype") from None


DTYPE = Annotated[str, IsDType()]


def _checks(hint) -> list:
    """The checks a field's annotation declares: its Literal's allowed values, its Annotated bounds."""
    if typing.get_origin(hint) is Annotated:
        inner, *marks = typing.get_args(hint)
        return _checks(inner) + [m for m in marks if callable(m)]
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)

        def one_of(field, value):
            if value not in allowed:
                raise ConfigError(f"{field}={value!r} is not one of {allowed}")
        return [one_of]
    return []


def field_checks(section: type) -> dict[str, list]:
    """{field: [check(field name, value)]} of a section's declared fields."""
    hints = typing.get_type_hints(section, include_extras=True)
    return {f.name: _checks(hints[f.name]) for f in dataclasses.fields(section)}


def check_section(c, name: str, section: type) -> None:
    """Each field of config section `name` accepts its value, as `section` declares."""
    for key, checks in field_checks(section).items():
        for check in checks:
            check(f"{name}.{key}", c[name][key])


def defaults(section: type) -> ConfigDict:
    """A section's fields with their defaults, as a config section."""
    return ConfigDict(dataclasses.asdict(section()))


def _overrides():
    return dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Model:
    """The student / the model being trained. Exactly one source: hf_dir, orbax_dir or preset."""

    hf_dir: str = ""  # a Hugging Face Qwen2-VL / Qwen2.5-VL directory (config.json + *.safetensors)
    orbax_dir: str = ""  # a clinkd_jax params checkpoint (python -m clinkd_jax.convert)
    # build from scratch: tiny | tiny_qwen | qwen2vl_2b | qwen2vl_7b | qwen2vl_72b | qwen2_5_vl_3b | qwen2_5_vl_7b |
    # qwen3_vl_2b | qwen3_vl_4b | qwen3_vl_8b
    preset: str = ""
    # the model family (qwen2_vl | qwen2_5_vl | qwen3_vl): a checkpoint's comes from its config.json (model_type)
    # and a value here must agree with it; with a preset, the preset's sizes with that family's vision tower (and,
    # for qwen3_vl, its LLM's q/k norms and DeepStack); "" = as given
    family: str = ""
    text_overrides: dict = _overrides()  # with a preset: LLM fields to change, e.g. {"hidden_size": 128}
    vision_overrides: dict = _overrides()  # with a preset: vision-tower fields to change, e.g. {"depth": 4}
    # with a preset: "data" = embedding/LM-head rows only for the token ids the training and test data use
    # (clinkd_jax.data.vocab; the demo's CPU speed-up); a JSON file of ids; "" = the full vocabulary.
    # A checkpoint's own vocabulary (model_config.json) always applies; the teacher shares the model's.
    compact_vocab: str = ""
    dtype: DTYPE = "bfloat16"  # compute dtype
    param_dtype: DTYPE = "float32"  # master weights (optimizer state is float32 too)
    attention: Literal[IMPLS] = "xla"  # cudnn: GPU; splash: TPU
    # activations recomputed in the backward pass, per layer (least recompute first; clinkd_jax.models.layers)
    remat: Literal[REMAT_POLICIES] = "none"
    # moved to runtime.* (below): still read from here when set, with a warning, while runtime.* keeps its default
    scan_unroll: int = 1
    attention_loop: str = "auto"
    vision_query_block: int = 0
    decode_layers: str = "auto"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher (stage "kd"): the model's sources; it shares the mesh, is never donated, has no optimizer
    state."""

    hf_dir: str = ""
    orbax_dir: str = ""
    preset: str = ""
    family: str = ""  # as model.family, for the teacher
    text_overrides: dict = _overrides()
    vision_overrides: dict = _overrides()
    dtype: DTYPE = "bfloat16"
    positions: Literal["shared", "own"] = "shared"  # "shared": the student's MCG-RoPE ids (released) | "own": (1, 1)
    # the online teacher's weights quantised as lora.base_quant's are (weights only), to free memory: "" | int8 |
    # int4 | nf4; it scores in teacher.dtype
    quant: Literal[("", *quant.QTYPES)] = ""


@dataclasses.dataclass(frozen=True)
class Data:
    """Training data: where it is, how it is read, how it is batched."""

    format: Literal["medgrit", "sharegpt", "demo"] = "medgrit"  # demo: generate the bundled demo set into the workdir
    train_files: tuple = ("",)  # JSON files
    # format "demo": where the set is generated; "" = <workdir>/demo_data (recipes: <workdir>/demo_data)
    demo_dir: str = ""
    demo_train_per_image: int = 6  # format "demo": training conversations per source image (8 images)
    demo_test_per_image: int = 2  # format "demo": test items per source image and task
    # format "demo": where markers go: "random" (anywhere, any size) | "grid" (centred in a 3 x 3 cell, 2 sizes)
    demo_layout: Literal[LAYOUTS] = "random"
    image_dir: str = ""
    # Med-GRIT ids name no file type: <image_dir>/<id><ext> for the first of these that exists (DICOM included)
    image_ext: tuple = (".png", ".dcm", ".dicom", ".jpg", ".jpeg")
    # auto (told per file, logged) | 0-1000 (integers, Qwen2-VL) | 0-1 (floats)
    box_format: Literal[("auto", *BOX_FORMATS)] = "auto"
    # the boxes the model is trained on and answers with: "0-1000" = Med-GRIT's markup (integers on a 0-1000 scale
    # between box tokens; ClinKD's, every family's default) | "absolute" = Qwen2.5-VL's own grounding convention
    # (pixels of the resized image the model sees) | "json" = Qwen3-VL's ({"bbox_2d": [0-1000 x4], "label": ...}).
    # Files, predictions and scores stay 0-1000 Med-GRIT tags whichever it is.
    box_markup: Literal[BOX_MARKUPS] = "0-1000"
    tokenizer: str = ""  # directory; default: the model's hf_dir, else the bundled Qwen2 tokenizer
    # "qwen2vl" (built in) | "qwen3vl" (built in: no default system turn) | "" (the tokenizer's own) | a Jinja text
    chat_template: str = "qwen2vl"
    # global batch (all hosts): rows of one step; each host loads the rows its devices hold
    batch_size: Annotated[int, AtLeast(1, "must be > 0")] = 2
    text_buckets: tuple = (512, 1024, 2048)  # the last one is the cutoff (ClinKD: 2048)
    patch_buckets: tuple = (1024, 2304, 3136)  # per-sample patch slots; 768^2 px -> <= 2916 patches
    min_pixels: int = 32 * 32
    max_pixels: int = 768 * 768  # ClinKD training budget
    mrope_gaps: tuple = (2, 2)  # MCG-RoPE; (1, 1) = plain Qwen2-VL (the MCG ablation)
    num_epochs: int = 3  # 0 = repeat forever (then train.steps or train.total_steps_hint sets the length)
    shuffle: bool = True
    # several conversations per row, packed once up to the largest text and patch buckets (no attention across
    # them, positions from 0 each): fewer padded positions per step. The CE mean is unchanged; the KD sum runs
    # over kd.sum_rows *packed* rows (kd.sum_rows=0 or kd.reduction="mean" keep it independent of packing)
    pack: bool = False
    strict: bool = False  # True: stop at the first bad item instead of skipping and counting
    extra_files: tuple = ()  # more training records (ShareGPT JSON, absolute image paths), e.g. RCT corrections
    # replace: drop the original records whose id the extra files correct
    extra_mode: Literal["append", "replace"] = "append"
    worker_count: int = 0
    read_threads: int = 2
    # measured record sizes (tokens, patches) the batch plan is made from; "" = <workdir>/data_sizes.json
    sizes_cache: str = ""


@dataclasses.dataclass(frozen=True)
class Lora:
    """Low-rank adapters (LoRA, through qwix; clinkd_jax.models.lora) on the model being trained: only the adapters
    train, hold optimizer state and go into the training checkpoints (the base is read from its own checkpoint at
    every start); the trained model (params/, export_hf/) is the base with the adapters folded in."""

    rank: Annotated[int, AtLeast(0, "must be 0 (off: full fine-tuning) or the adapters' rank")] = 0
    alpha: float = 16.0  # the adapters' update is scaled by alpha / rank
    dropout: Annotated[float, Within(0, 1)] = 0.0  # on the adapters' inputs, training steps only
    # regexes over layer paths, named as Hugging Face names them: the LLM's attention and MLP projections by
    # default; clinkd_jax.models.lora has VISION and MERGER for the vision tower and the merger (their adapters
    # train only when optim.frozen, which freezes "visual/.*" by default, leaves them out)
    targets: tuple = (lora_lib.LLM,)
    # a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors: export_peft/ of a run here, or one
    # `peft` saved), with its own rank, alpha and layers (rank above: 0 or the adapter's; alpha and targets are not
    # read): training stages train on from it; evaluation (and predict / serve --adapter) fold it into the model
    adapter_dir: str = ""
    # QLoRA: the frozen base read quantised by the train step (weights only, one scale per output channel; every
    # matmul of both towers, not the embeddings, patch embedding or LM head): "" (off) | int8 | int4 | nf4. The
    # adapters train against it; params/ and export_hf/ fold them into its dequantised weights
    base_quant: Literal[("", *quant.QTYPES)] = ""


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs on this machine: loops, layouts and unrolling that change speed and memory, not
    results. They used to be model.* fields; a value still set there is read while runtime.* keeps its default
    (`runtime_field`), with a warning."""

    # decoder/ViT layers per scan iteration; >= the layer count: fully unrolled
    scan_unroll: Annotated[int, AtLeast(1)] = 1
    # attention "xla" (both towers; decode steps always batched): "per_head" = one (sample, KV head) pair at a
    # time (2-D matmuls, scores in cache, flash-style backward), "batched" = all pairs in one matmul,
    # "auto" = per_head on CPU (faster there, bench/history.md), batched elsewhere
    attention_loop: Literal[ATTENTION_LOOPS] = "auto"
    # vision attention query rows per block (bounds memory on big images); 0 = all
    vision_query_block: Annotated[int, AtLeast(0, "must be 0 (all rows) or a row count")] = 0
    # generation's one-token decode steps: "scan" = over the stacked layer weights as training does, "unrolled" =
    # the weights and KV cache laid out for decoding once per generate call (per-layer copies, LM head as rows,
    # a cache buffer per layer; no copy per token; costs a second copy of the decoder's weights while generating
    # and a decode-step compile time that grows with depth), "auto" = unrolled on CPU (faster there,
    # bench/history.md), scan elsewhere
    decode_layers: Literal[DECODE_LAYERS] = "auto"


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The device mesh and how logical axes map onto it."""

    rules: tuple = ()  # (logical axis, mesh axis | (axes) | None) pairs; () = clinkd_jax.sharding.DEFAULT_RULES
    shape: tuple = (1, -1, 1)  # data, fsdp, tensor; -1 = the remaining devices (without -1: the first devices)


SECTIONS = {"model": Model, "teacher": Teacher, "data": Data, "lora": Lora, "runtime": Runtime, "mesh": Mesh}
RUNTIME_DEFAULTS = dataclasses.asdict(Runtime())
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
    it runs here (runtime.*); `training` adds param_dtype / remat for the model being trained (its LoRA adapters:
    `lora.adapted`)."""
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
    for key, checks in field_checks(Runtime).items():
        field, value = runtime_field(c, key)
        for check in checks:
            check(field, value)


def check(c, sections: dict | None = None, teacher_required: bool = False) -> None:
    """The shared sections and a stage's own `sections` ({name: section}), each field on its own (as declared),
    and the shared fields against each other; reads no file."""
    for name, section in {**SECTIONS, **(sections or {})}.items():
        if name != "runtime":  # read where it is set (`check_runtime`)
            check_section(c, name, section)
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
