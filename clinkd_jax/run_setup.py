"""What every stage (training, distillation, pseudo-labels, RCT, evaluation) sets up from the run config:
the mesh and its rules, models from their sources, the vocabulary, the tokenizer, the data.

It sits below `train/`, `eval/` and `infer/` in the import graph: they import it, it imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import jax
import numpy as np

from clinkd_jax import checkpoint, distributed, files, sharding
from clinkd_jax.convert import hf
from clinkd_jax.data import demo, pipeline, processor, records, text
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import vocab as vocab_lib
from clinkd_jax.data.markup import BOX_FORMATS, BOX_MARKUPS
from clinkd_jax.models import config as model_config
from clinkd_jax.models import presets
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import ATTENTION_LOOPS, DECODE_LAYERS, Qwen2VL, init_params

log = logging.getLogger("clinkd_jax.setup")
TASKS = ("VG", "RO", "GC", "MII")
SOURCES = ("hf_dir", "orbax_dir", "preset")  # where a model (config.model, config.teacher) comes from
HOST_ONLY = ("sample_mask", "decode_offsets", "record_index")  # batch fields the jitted steps do not read


# ------------------------------------------------------------------------------------ devices
def make_run_mesh(c, devices=None):
    """(mesh, logical rules) from config.mesh over `devices` (default: all; a TPU slice's described devices for
    `clinkd_jax.aot`); a smaller explicit mesh uses the first devices."""
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(c.mesh.shape)
    n_mesh = int(np.prod(shape)) if -1 not in shape else len(devices)
    mesh = sharding.make_mesh(shape, devices=devices[:n_mesh])
    rules = tuple(tuple(r) for r in c.mesh.rules) if c.mesh.rules else sharding.DEFAULT_RULES
    return mesh, rules


# ------------------------------------------------------------------------------------- models
def config_of(src, vocab_ids=None) -> model_config.Qwen2VLConfig:
    """The model geometry named by src.hf_dir | src.orbax_dir | src.preset (+ the family's vision tower,
    text_overrides and vision_overrides, + a compact vocabulary `vocab_ids` for a preset); no weights read."""
    family = src.get("family", "")
    if src.hf_dir or src.orbax_dir:
        cfg = (processor.read(src.hf_dir, model_config.Qwen2VLConfig.from_hf_dir(src.hf_dir)) if src.hf_dir
               else checkpoint.load_config(src.orbax_dir))
        if family and family != cfg.family:
            raise ConfigError(f"{src.hf_dir or src.orbax_dir} holds a {cfg.family} model, but its family is set to "
                              f"{family!r}; a checkpoint's family is its own (unset the family field)")
        note = checkpoint_decoding(src.hf_dir or os.path.join(src.orbax_dir, checkpoint.ASSETS_DIR))
        if note and note not in _SAID:  # once per run, however often the geometry is asked for
            _SAID.add(note)
            log.info(note)
        return cfg
    cfg = presets.PRESETS[src.preset]()
    for part in ("text", "vision"):  # the LLM's sizes before the family (Qwen3-VL's DeepStack fits its depth), the
        overrides = src.get(f"{part}_overrides")  # tower's after (they may set the family's own fields)
        if overrides:
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.to_dict().items()}
            cfg = cfg.replace(**{part: dataclasses.replace(getattr(cfg, part), **fields)})
        if family and part == "text":
            cfg = model_config.as_family(cfg, family)
    return cfg if vocab_ids is None else vocab_lib.compact_config(cfg, vocab_ids)


# generation_config.json fields and the value at which they change nothing (greedy, no penalty)
_NEUTRAL = {"do_sample": False, "repetition_penalty": 1.0, "num_beams": 1, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


_SAID: set[str] = set()


def checkpoint_decoding(folder: str) -> str:
    """What a checkpoint's generation_config.json asks that decoding here does not do, as one log line ("" if
    nothing): decoding follows the run's settings (eval.temperature / top_p: greedy for the ClinKD protocol, which
    the released scripts approach with Qwen2-VL-Instruct's near-greedy file), and stops at the tokenizer's
    end-of-turn and end-of-text tokens."""
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return ""
    asked = {k: d[k] for k in _NEUTRAL if k in d and d[k] not in (None, _NEUTRAL[k])}
    if d.get("do_sample"):
        asked.update({k: d[k] for k in ("temperature", "top_p", "top_k") if k in d})
    if not asked:
        return ""
    return (f"{path}: not applied: {', '.join(f'{k}={v}' for k, v in asked.items())} (decoding follows the run's "
            "eval.temperature / eval.top_p; no repetition penalty or beam search here; docs/models.md)")


def load_model(src, mesh, rules, seed: int, vocab_ids=None, dtype: str | None = None):
    """(Qwen2VLConfig, params on their shards) from src.hf_dir | src.orbax_dir | src.preset (random, seeded);
    `dtype`: the parameters' dtype (None: a checkpoint's own, float32 for a preset)."""
    cfg = config_of(src, vocab_ids)  # the geometry (and its family checked) before any weight is read
    if src.hf_dir:
        return hf.load_hf_checkpoint(src.hf_dir, config=cfg, mesh=mesh, rules=rules, dtype=dtype)
    if src.orbax_dir:
        return checkpoint.load_params(src.orbax_dir, mesh=mesh, rules=rules, dtype=dtype)
    return cfg, init_params(Qwen2VL(cfg, param_dtype=dtype or "float32"), jax.random.key(seed), mesh, rules)


def model_for(c, cfg: model_config.Qwen2VLConfig, dtype: str | None = None, **training) -> Qwen2VL:
    """The module for geometry `cfg` as the run config sets it up (compute dtype, attention kernel, scan
    unrolling); `training` adds param_dtype / remat for the model being trained."""
    return Qwen2VL(cfg, dtype=dtype or c.model.dtype, attention_impl=c.model.attention,
                   scan_unroll=c.model.scan_unroll, attention_loop=c.model.attention_loop,
                   vision_query_block=c.model.vision_query_block, decode_layers=c.model.decode_layers, **training)


SPECIAL_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id",
               "eos_token_id")


def same_inputs(cfg, other, what: str) -> None:
    """One batch means the same to both models (a teacher or corrector reads the student's): the same (full or
    compact) token rows and special ids, and the same image processing (patch geometry, normalisation). Vocabulary
    sizes may differ by padding rows (Qwen2.5-VL-7B 152064 vs 3B 151936): losses cut to the student's."""
    mine, theirs = image_lib.for_model(cfg, 1, 1), image_lib.for_model(other, 1, 1)  # the run's budget is theirs
    if mine != theirs:
        raise ConfigError(f"{what} ({other.family}: {theirs.patch_size} px patches, mean {theirs.mean}) reads images "
                          f"differently from the model ({cfg.family}: {mine.patch_size} px patches, mean {mine.mean}): "
                          "they cannot share a batch; pick a teacher of the same image processing")
    if cfg.vocab_ids != other.vocab_ids:
        def n(x):
            return "the full vocabulary" if x.vocab_ids is None else f"a compact vocabulary of {len(x.vocab_ids)} ids"

        raise ConfigError(f"{what} has {n(other)} but the model has {n(cfg)}: token ids would not line up")
    for key in SPECIAL_IDS:
        if getattr(cfg, key) != getattr(other, key):
            raise ConfigError(f"{what} has {key}={getattr(other, key)} but the model has {getattr(cfg, key)}: "
                              "a different tokenizer; its logits would not line up with the model's tokens")


# --------------------------------------------------------------------------------------- data
def demo_root(c, workdir) -> str:
    """The embedded demo set (data.format "demo"): data.demo_dir or <workdir>/demo_data, generated if needed.
    Process 0 writes it first; the other hosts then find it (shared workdir) or write their own copy."""
    root = c.data.demo_dir or os.path.join(workdir, "demo_data")
    kw = {"train_per_image": c.data.demo_train_per_image, "test_per_image": c.data.demo_test_per_image}
    if c.data.demo_layout != "random":  # only when set, so demo folders written before the option stay valid
        kw["layout"] = c.data.demo_layout
    if jax.process_index() == 0:
        demo.ensure(root, **kw)
    distributed.barrier("demo data")
    return demo.ensure(root, **kw)


def training_records(c, workdir, log_) -> list:
    """The run's training records (demo data generated into <workdir>/demo_data when absent)."""
    d = c.data
    if d.format == "demo":
        root = demo_root(c, workdir)
        return records.read_medgrit(os.path.join(root, "train.json"), os.path.join(root, "images"), log=log_)
    if d.format == "sharegpt":
        return [r for f in d.train_files for r in records.read_sharegpt(f, d.image_dir, log=log_,
                                                                        box_format=d.box_format)]
    return [r for f in d.train_files
            for r in records.read_medgrit(f, d.image_dir, log=log_, box_format=d.box_format, image_ext=d.image_ext)]


def eval_records(c, path: str, workdir: str, log_) -> list:
    """A Med-GRIT test file's records. Items whose image is missing are kept: evaluation scores them as misses."""
    return records.read_medgrit(path, eval_image_dir(c, workdir), log=log_, check_images=False,
                                box_format=c.data.box_format, image_ext=c.data.image_ext)


def with_extra(recs: list, files, mode: str, log_) -> list:
    """The training pool plus the records of `files` (ShareGPT, e.g. RCT corrections), appended, or
    replacing the records with the same id (mode "replace")."""
    extra = [r for f in files for r in records.read_sharegpt(f, "", log=log_)]  # (RCT writes 0-1000 boxes)
    if mode == "replace":
        corrected = {r.id for r in extra}
        recs = [r for r in recs if r.id not in corrected]
    if files:
        log.info("training pool: %d records incl. %d from %s (%s)", len(recs) + len(extra), len(extra), list(files),
                 mode)
    return recs + extra


def task_of(path: str) -> str | None:
    """'VG' | 'RO' | 'GC' | 'MII' from a file name such as Test_VG.json(l) or ..._RO_..., else None."""
    name = os.path.basename(path).upper()
    for task in ("MII", "VG", "RO", "GC"):
        if re.search(rf"(^|[_\-.]){task}([_\-.]|$)", name):
            return task
    return None


def test_files(c, workdir: str) -> dict[str, str]:
    """{task: Test_<task>.json} from eval.files or eval.data_dir + eval.tasks (demo: generated in the workdir)."""
    e = c.eval
    if e.files:
        return {task_of(f): f for f in e.files}
    data_dir = e.data_dir or (demo_root(c, workdir) if c.data.format == "demo" else "")
    return {t: os.path.join(data_dir, f"Test_{t}.json") for t in e.tasks}


def eval_image_dir(c, workdir: str) -> str:
    if c.eval.image_dir:
        return c.eval.image_dir
    if c.data.format == "demo" and not c.eval.data_dir:
        return os.path.join(demo_root(c, workdir), "images")
    return c.data.image_dir


# ---------------------------------------------------------------------------- vocabulary, text
def tokenizer_dir(c) -> str:
    """data.tokenizer, else the model's HF directory, else the tokenizer files saved with an Orbax params
    checkpoint (hf_assets/), else (a preset, built from scratch) the bundled Qwen2 tokenizer. A checkpoint
    without its tokenizer is an error: another tokenizer would silently mis-map every id."""
    for field, d in (("data.tokenizer", c.data.tokenizer), ("model.hf_dir", c.model.hf_dir)):
        if d and not any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "vocab.json")):
            raise ConfigError(f"{field}={d!r} holds no tokenizer (tokenizer.json or vocab.json)"
                              + ("; set data.tokenizer to the model's tokenizer" if field == "model.hf_dir" else ""))
        if d:
            return d
    if c.model.orbax_dir:
        assets = os.path.join(c.model.orbax_dir, checkpoint.ASSETS_DIR)
        if not os.path.isfile(os.path.join(assets, "tokenizer.json")):
            raise ConfigError(f"model.orbax_dir={c.model.orbax_dir!r} holds no tokenizer ({checkpoint.ASSETS_DIR}/"
                              "tokenizer.json); set data.tokenizer to the tokenizer it was trained with")
        return assets
    return text.bundled_qwen2_tokenizer_dir()


def _tokenizer_file(src) -> str | None:
    """The tokenizer.json a checkpoint source carries (None for a preset, or none saved)."""
    d = src.hf_dir or (os.path.join(src.orbax_dir, checkpoint.ASSETS_DIR) if src.orbax_dir else "")
    f = os.path.join(d, "tokenizer.json") if d else ""
    return f if f and os.path.isfile(f) else None


def check_same_tokenizer(c, name: str = "teacher") -> None:
    """config.<name> (a teacher, a corrector) encodes text as the model does: where both checkpoints carry a
    tokenizer, their vocabularies and added tokens are the same (Qwen2-VL and Qwen2.5-VL share one)."""
    files = [_tokenizer_file(c.model), _tokenizer_file(c[name])]
    if None in files:
        return
    tables = []
    for f in files:
        with open(f) as fh:
            tok = json.load(fh)
        tables.append(((tok.get("model") or {}).get("vocab"), [(t.get("id"), t.get("content"))
                                                              for t in tok.get("added_tokens") or ()]))
    if tables[0] != tables[1]:
        raise ConfigError(f"{name}: its tokenizer ({files[1]}) is not the model's ({files[0]}): token ids would mean "
                          "different text; distil between models of one tokenizer")


def compact_vocab(c, workdir) -> tuple[int, ...] | None:
    """The vocabulary ids `model.compact_vocab` asks for (None: full); only a preset model is compacted.
    "data": every id the training records and the eval test files encode to (clinkd_jax.data.vocab)."""
    want = c.model.compact_vocab
    if not want or not c.model.preset:
        return None
    tok = text.load_tokenizer(tokenizer_dir(c))
    if want != "data":
        with open(want) as f:
            return vocab_lib.build_ids(tok, json.load(f))
    quiet = records.SkipLog(strict=False)  # the stage's own reading reports skips
    has_train = c.data.format == "demo" or any(c.data.train_files)  # an eval-only config may have none
    recs = (training_records(c, workdir, quiet) if has_train else []) + [
        r for f in test_files(c, workdir).values() if os.path.isfile(f) for r in eval_records(c, f, workdir, quiet)]
    encoder = text.ChatEncoder(tok, c.data.chat_template or None)
    used = {int(i) for r in recs for i in encoder.encode(r.turns, [1] * len(r.images)).input_ids}
    ids = vocab_lib.build_ids(tok, used)
    log.info("compact vocabulary: %d ids (%d used by %d records)", len(ids), len(used), len(recs))
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "vocab_ids.json"), list(ids), indent=None)
    return ids


# what decides how a trained model is asked a question (saved beside its params: checkpoint.ANSWER_SETTINGS)
ANSWER_FIELDS = {"data": ("chat_template", "box_markup", "mrope_gaps"),
                 "eval": ("min_pixels", "max_pixels", "text_buckets", "patch_buckets", "max_new_tokens",
                          "max_new_tokens_mii", "temperature", "top_p"),
                 "model": ("dtype",)}


def answer_settings(c) -> dict:
    return {part: {k: c[part][k] for k in keys} for part, keys in ANSWER_FIELDS.items()}


def encoder_for(c, vocab_ids=None) -> text.ChatEncoder:
    """The chat encoder of the run: its tokenizer (mapped to `vocab_ids` rows) and template."""
    tok = vocab_lib.tokenizer_for(text.load_tokenizer(tokenizer_dir(c)), vocab_ids)
    return text.ChatEncoder(tok, c.data.chat_template or None, box_markup=c.data.box_markup)


def pipeline_config(c, encoder, model_cfg, mesh, rules, host_rows: bool = True, **changes) -> pipeline.PipelineConfig:
    """The training pipeline's settings for a model of `model_cfg` (its image processing); this process loads the
    global batch rows its devices hold (`host_rows`; False: all rows, for a mesh of devices this process does not
    run, `clinkd_jax.aot`)."""
    d = c.data
    return dataclasses.replace(pipeline.PipelineConfig(
        batch_size=d.batch_size, rows=sharding.process_rows(d.batch_size, mesh, rules) if host_rows else None,
        text_buckets=tuple(d.text_buckets), patch_buckets=tuple(d.patch_buckets),
        image=image_lib.for_model(model_cfg, d.min_pixels, d.max_pixels), mrope_gaps=tuple(d.mrope_gaps),
        seed=c.seed, shuffle=d.shuffle, num_epochs=d.num_epochs or None, worker_count=d.worker_count,
        read_threads=d.read_threads, strict=d.strict, pack=d.pack,
        teacher_mrope_gaps=(1, 1) if c.stage == "kd" and c.teacher.positions == "own" else None,
        pseudo_labels=(c.kd.pseudo_labels or None) if c.stage == "kd" else None,
        image_token_id=encoder.image_pad_id, pad_token_id=encoder.pad_id,
    ), **changes)


def device_batch(batch: dict, mesh, rules, global_batch: int) -> dict:
    """This host's rows of a global training batch -> the global arrays a jitted step takes."""
    return sharding.place_batch({k: v for k, v in batch.items() if k not in HOST_ONLY}, mesh, rules, global_batch)


def sizes_cache(c, workdir: str) -> str:
    """Where the measured record sizes are kept (data.sizes_cache, else in the workdir)."""
    return c.data.sizes_cache or os.path.join(workdir, "data_sizes.json")


# ------------------------------------------------------------------------- config checks (shared)
def check_source(c, name: str, required: bool) -> None:
    """config.<name> names at most one existing model source (exactly one when `required`)."""
    src = c[name]
    given = [k for k in SOURCES if src[k]]
    if len(given) > 1:
        raise ConfigError(f"{name}: give exactly one of hf_dir / orbax_dir / preset, got "
                          f"{', '.join(f'{name}.{g}' for g in given)}")
    if not given:
        if required:
            raise ConfigError(f"{name}: no source; set {name}.hf_dir, {name}.orbax_dir or {name}.preset")
        return
    if src.preset and src.preset not in presets.PRESETS:
        raise ConfigError(f"{name}.preset={src.preset!r} is not one of {sorted(presets.PRESETS)}")
    if src.get("family", "") and src.family not in model_config.FAMILIES:
        raise ConfigError(f"{name}.family={src.family!r} is not one of {sorted(model_config.FAMILIES)}")
    for part, kind in (("text", model_config.TextConfig), ("vision", model_config.VisionConfig)):
        overrides = src.get(f"{part}_overrides")
        if overrides and not src.preset:  # a checkpoint's geometry is its own
            raise ConfigError(f"{name}.{part}_overrides apply to a preset only, not to {name}.{given[0]}")
        unknown = sorted(set(overrides or ()) - {f.name for f in dataclasses.fields(kind)})
        if unknown:
            raise ConfigError(f"{name}.{part}_overrides: {unknown} are not {kind.__name__} fields")
    for key in ("hf_dir", "orbax_dir"):
        if src[key] and not os.path.isdir(src[key]):
            raise ConfigError(f"{name}.{key}={src[key]!r} is not a directory")


def check_common(c) -> None:
    """The fields every model-running stage reads: the model source, its vocabulary, how data files are read."""
    check_source(c, "model", required=True)
    vocab = c.model.compact_vocab
    if vocab and c.model.preset:  # a checkpoint keeps its own vocabulary
        if vocab != "data" and not os.path.isfile(vocab):
            raise ConfigError(f"model.compact_vocab={vocab!r} is neither 'data' nor a JSON file of token ids")
        if c.checkpoint.export_hf:
            raise ConfigError("checkpoint.export_hf: a compact-vocabulary model cannot be exported to the Hugging "
                              "Face layout (full vocabulary); unset model.compact_vocab or export_hf")
    if c.data.box_markup not in BOX_MARKUPS:
        raise ConfigError(f"data.box_markup={c.data.box_markup!r} is not one of {BOX_MARKUPS}")
    template = c.data.chat_template
    if template and template not in text.TEMPLATES and "{%" not in template and "{{" not in template:
        raise ConfigError(f"data.chat_template={template!r} is neither a built-in template "
                          f"({sorted(text.TEMPLATES)}), '' (the tokenizer's own) nor a Jinja template")
    if c.data.box_format not in ("auto", *BOX_FORMATS):
        raise ConfigError(f"data.box_format={c.data.box_format!r} is not one of {('auto', *BOX_FORMATS)}")
    if c.data.demo_layout not in demo.LAYOUTS:
        raise ConfigError(f"data.demo_layout={c.data.demo_layout!r} is not one of {demo.LAYOUTS}")
    if c.model.scan_unroll < 1:
        raise ConfigError(f"model.scan_unroll={c.model.scan_unroll} must be >= 1")
    if c.model.vision_query_block < 0:
        raise ConfigError(f"model.vision_query_block={c.model.vision_query_block} must be 0 (all rows) or a row count")
    if c.model.attention_loop not in ATTENTION_LOOPS:
        raise ConfigError(f"model.attention_loop={c.model.attention_loop!r} is not one of "
                          f"{ATTENTION_LOOPS}")
    if c.model.decode_layers not in DECODE_LAYERS:
        raise ConfigError(f"model.decode_layers={c.model.decode_layers!r} is not one of {DECODE_LAYERS}")
    exts = tuple(c.data.image_ext)
    if not exts or not all(isinstance(e, str) and e.startswith(".") for e in exts):
        raise ConfigError(f"data.image_ext={exts} must be file extensions such as ('.png', '.dcm')")
    check_nothing_ignored(c)


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
