"""The programs a run config would compile, lowered from abstract shapes on a mesh of any devices.

Per stage (`config.stage`, or each of `config.stages`): an "sft"/"kd" stage compiles its train step once per
(text, patch) bucket (`clinkd_jax.train.program.build`, what `train.loop` runs; KD with the online teacher or
from pseudo-labels), plus generation when it evaluates (`eval.every_steps`) or corrects (`rct.every_steps`)
while it trains; an "eval" stage compiles generation per (prompt, patch) bucket and answer length; an "rct" stage
the student's greedy answers and the corrector's sampled ones. Generation is `infer.generate.Generator`'s
program. Inputs are the pipeline's own filler batches (`pipeline.empty_batch`, `prompts.collate_prompts`) placed
as `sharding.abstract_batch` places them; nothing is read or allocated.

Model geometry comes from each source's config without its weights: an `hf_dir`'s config.json; a published
checkpoint's name when the directory is not on this machine (Qwen2-VL-2B/7B/72B, announced); a chained
stage's params (`<workdir>/<stage>/params`) from that stage; a preset.

The compiler's time estimate needs loop-free programs (XLA's cost analysis counts a loop's body once): twins of
each program with 1 or 2 layers in each tower, the layers and the loss's chunks unrolled, and 1 or 2 generated
tokens, from which the cost of the real depths and lengths follows linearly (`estimate`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from typing import Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from clinkd_jax import cli, recipe, settings, sharding
from clinkd_jax.checkpoint import abstract_with_shardings
from clinkd_jax.data import dataset, pipeline
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import pseudo_labels as pl_store
from clinkd_jax.eval import config as eval_config
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.infer import prompts
from clinkd_jax.model_source import ModelSource, same_inputs
from clinkd_jax.models import config as model_config
from clinkd_jax.models import flops as flops_lib
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models import presets
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import param_shardings
from clinkd_jax.stage import StageContext
from clinkd_jax.train import config as train_config
from clinkd_jax.train import program as program_lib
from clinkd_jax.train import state as state_lib

log = logging.getLogger("clinkd_jax.aot")
# published checkpoints by directory name -> preset (72b before 7b: "qwen2-vl-72b" contains "qwen2-vl-7")
PUBLISHED = (("qwen2-vl-72b", "qwen2vl_72b"), ("qwen2-vl-7b", "qwen2vl_7b"), ("qwen2-vl-2b", "qwen2vl_2b"),
             ("qwen2.5-vl-7b", "qwen2_5_vl_7b"), ("qwen2.5-vl-3b", "qwen2_5_vl_3b"), ("qwen3-vl-8b", "qwen3_vl_8b"),
             ("qwen3-vl-4b", "qwen3_vl_4b"), ("qwen3-vl-2b", "qwen3_vl_2b"))


@dataclasses.dataclass(frozen=True)
class Geometry:
    cfg: model_config.Qwen2VLConfig
    dtype: str  # the dtype its params are loaded in (a checkpoint's own, or the run's param_dtype)
    where: str  # where the geometry came from, for the report


@dataclasses.dataclass
class Program:
    name: str  # "train_sft", "train_kd", "train_kd_pseudo_labels", "generate_eval", "generate_rct", ...
    stage: str
    bucket: tuple[int, int]
    lower: Callable[[dict | None], object]  # twin counts (None: the real program) -> jax Lowered
    dims: dict[str, int]  # the real depths and lengths the twins scale to
    flops: float  # model FLOPs of one call (models/flops.py)
    resident: int = 0  # bytes per chip held beside the program's own (a training state during in-run generation)
    notes: tuple[str, ...] = ()
    base: dict[str, int] = dataclasses.field(default_factory=dict)  # the smaller twin's count per dim (default 1)


def _source(c, src: ModelSource, chained: dict[str, Geometry], workdir: str, vocab_ids) -> Geometry:
    """The geometry of a stage's model or teacher `src` without reading weights."""
    name = src.section
    dtype = "bfloat16" if name == "teacher" else c.model.param_dtype
    if src.kind == "preset":
        return Geometry(src.geometry(vocab_ids), c.model.param_dtype if name == "model" else "float32",
                        src.describe())
    if os.path.isdir(src.where):
        return Geometry(src.geometry(), dtype if src.kind == "hf_dir" else c.model.param_dtype, src.where)
    if src.kind == "orbax_dir":
        for stage, geo in chained.items():
            if os.path.normpath(src.where) == os.path.normpath(os.path.join(workdir, stage, "params")):
                return dataclasses.replace(geo, where=f"stage {stage}'s params")
        raise ConfigError(f"{name}.orbax_dir={src.where!r} does not exist")
    base = os.path.basename(os.path.normpath(src.where)).lower()
    for key, preset in PUBLISHED:
        if key in base:
            log.warning("%s.hf_dir=%s is not on this machine: its geometry is taken from the name (%s)", name,
                        src.where, preset)
            return Geometry(presets.PRESETS[preset](), dtype, f"{src.where} (not here: {preset} by its name)")
    raise ConfigError(f"{name}.hf_dir={src.where!r} is not on this machine and its name is not a published "
                      f"Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint's; aot needs only its geometry: add "
                      f"--config.{name}.hf_dir= "
                      f"--config.{name}.preset=qwen2vl_7b (or another of {sorted(presets.PRESETS)})")


def check_settings(c, devices: int) -> None:
    """The stage's own config checks that read no file (its data and checkpoints need not be on this machine),
    with its mesh on the described slice's `devices`: a bad value stops here, naming the field."""
    if c.stage == "eval":
        eval_config.check_settings(c)
    else:
        train_config.check_settings(c)
    train_config.check_devices(c, devices)


def config_file(path: str, **overrides) -> ConfigDict:
    """`get_config()` of a configs/<x>.py file with dotted overrides ({"kd.alpha": 0.5}), as the command line
    would give them (benchmarks that sweep configs)."""
    c = cli.load_config_file(path)
    for key, value in overrides.items():
        unknown = cli.unknown_override(c, [f"--config.{key}"])  # a new key would be ignored by the run
        if unknown:
            raise ConfigError(unknown)
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def stage_configs(c, workdir: str) -> list[tuple[str, ConfigDict]]:
    if c.stages:
        return [(name, cfg) for name, cfg, _ in recipe.stage_configs(c, workdir)]
    return [(c.stage, c)]


def _buckets(text, patches, which: str) -> list[tuple[int, int]]:
    pairs = [(int(t), int(p)) for t in text for p in patches]
    return pairs if which == "all" else [max(pairs)]


def _twin(c, cfg, counts: dict | None, prefix: str):
    """(config, geometry) of a cost twin: `counts` layers per tower ("<prefix>layers", "<prefix>depth" and, with
    window attention, "<prefix>full_depth": blocks over the whole image after the windowed ones), every scan
    unrolled. None: the real ones."""
    if counts is None:
        return c, cfg
    t = copy.deepcopy(c)
    t.runtime.scan_unroll, t.model.scan_unroll = 1 << 12, 1  # (the deprecated field would disagree)
    windowed = counts[prefix + "depth"]
    depth = windowed + counts.get(prefix + "full_depth", 0)
    vision = dataclasses.replace(cfg.vision, depth=depth, fullatt_block_indexes=tuple(range(windowed, depth)),
                                 # DeepStack taps cost nothing, its mergers the same at any depth: a shallow twin
                                 # taps its last block
                                 deepstack_visual_indexes=tuple(min(i, depth - 1)
                                                                for i in cfg.vision.deepstack_visual_indexes))
    return t, cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=counts[prefix + "layers"]),
                          vision=vision)


def _dims(cfg, prefix: str = "") -> tuple[dict[str, int], dict[str, int]]:
    """(real counts, the smaller twin's counts where not 1) of one model's towers. Window attention: windowed and
    whole-image blocks are counted apart (they cost differently). DeepStack: the LLM twins keep a layer per
    feature, each feature being added after its own layer."""
    v, t = cfg.vision, cfg.text
    dims, base = {prefix + "layers": t.num_hidden_layers, prefix + "depth": v.depth}, {}
    if v.window_size:
        full = len(v.fullatt_block_indexes)
        dims |= {prefix + "depth": v.depth - full, prefix + "full_depth": full}
        base[prefix + "full_depth"] = 0
    if len(v.deepstack_visual_indexes) > 1:
        base[prefix + "layers"] = len(v.deepstack_visual_indexes)
    return dims, base


def train_programs(name, c, student: Geometry, teacher: Geometry | None, mesh, rules, buckets: str) -> list[Program]:
    cached = c.stage == "kd" and bool(c.kd.pseudo_labels)
    top_k = 0
    if cached:
        top_k = (pl_store.read_meta(c.kd.pseudo_labels).get("top_k", c.kd.top_k)
                 if os.path.isdir(c.kd.pseudo_labels) else c.kd.top_k)
    kind = "train_kd_pseudo_labels" if cached else f"train_{c.stage}"
    online = teacher if c.stage == "kd" and not cached else None
    if online is not None:
        same_inputs(student.cfg, online.cfg, "the teacher")
    # all rows (a slice's hosts); the token ids fill the filler batches, whose shapes do not depend on them
    pcfg = dataset.pipeline_config(c, (student.cfg.image_token_id, 0), student.cfg, None)
    out = []
    for bucket in _buckets(c.data.text_buckets, c.data.patch_buckets, buckets):
        dims, base = _dims(student.cfg)
        if online is not None:
            t_dims, t_base = _dims(online.cfg, "teacher_")
            dims, base = dims | t_dims, base | t_base
        lora = lora_lib.config(c.lora)  # (an adapter_dir's own targets are not read here: the LLM's assumed)
        adapters = lora is not None or bool(c.lora.adapter_dir)
        frozen = _vision_frozen(c) or (adapters and not any(t.startswith("visual") for t in c.lora.targets))
        step_flops = lambda length, bucket=bucket: flops_lib.train_step_flops(
            student.cfg, c.data.batch_size, length, [bucket[1]], teacher=online and online.cfg, train_vision=not frozen,
            adapters=adapters)
        sampled = train_config.sampled_answers(c)
        n = c.kd.max_new_tokens
        if not (sampled and c.kd.seq_kd):  # the step on the data's answers
            lower = functools.partial(_lower_train, c, student, online, mesh, rules, pcfg, bucket, top_k, "step")
            out.append(Program(kind, name, bucket, lower, dims, step_flops(bucket[0]), base=base))
        for which, by, frac in (("step", online, c.kd.seq_kd), ("on_policy_step", student, c.kd.on_policy_fraction)):
            if not (sampled and frac):
                continue  # the answers sampled in a step: by the teacher (kd.seq_kd) or the student (on-policy)
            lower = functools.partial(_lower_train, c, student, online, mesh, rules, pcfg, bucket, top_k, which)
            flops = step_flops(bucket[0] + n) + flops_lib.generate_flops(by.cfg, c.data.batch_size, bucket[0],
                                                                         [bucket[1]], n)
            program = "train_kd_on_policy" if which == "on_policy_step" else "train_kd_seq_kd"
            out.append(Program(program, name, bucket, lower, dims | {"new_tokens": n}, flops, base=base,
                               notes=(f"generates {n} tokens per row, then trains on the prompt and the answer",)))
    return out


def _lower_train(c, student: Geometry, online: Geometry | None, mesh, rules, pcfg, bucket, top_k: int, which: str,
                 counts):
    """A training program (`which`: TrainProgram.step or .on_policy_step) lowered at `bucket`, for twin `counts`."""
    tc, s_cfg = _twin(c, student.cfg, counts, "")
    _, t_cfg = (None, None) if online is None else _twin(c, online.cfg, counts, "teacher_")
    if counts is not None and "new_tokens" in counts:
        tc.kd.max_new_tokens = counts["new_tokens"]
    # the tokenizer's stop and pad ids: any ids of the vocabulary compile the same program
    prog = program_lib.build(tc, s_cfg, mesh, rules, teacher_cfg=t_cfg, loss_unrolled=counts is not None,
                             tokens=((s_cfg.eos_token_id,), 0))
    batch = {k: v for k, v in pipeline.empty_batch(pcfg, bucket, top_k).items() if k not in pipeline.HOST_ONLY}
    if prog.samples:
        batch["record_index"] = np.zeros((c.data.batch_size,), np.int32)
    batch = sharding.abstract_batch(batch, mesh, rules)
    with sharding.use_mesh(mesh, rules):
        return getattr(prog, which).lower(prog.abstract_state(), prog.abstract_teacher(online and online.dtype),
                                          batch, *prog.abstract_base())


def _vision_frozen(c) -> bool:
    return any(p.startswith("visual") for p in c.optim.frozen)


def generate_programs(name, kind, c, geo: Geometry, mesh, rules, buckets, batch_size: int, text, patches,
                      new_tokens: tuple[int, ...], temperature: float, top_p: float = 1.0,
                      resident: int = 0) -> list[Program]:
    """Generation as `Generator` compiles it: per (prompt, patch) bucket and answer length, with the run's sampling
    (nucleus sampling adds a sort over the vocabulary)."""
    out = []
    for bucket in _buckets(text, patches, buckets):
        for n in sorted(set(new_tokens)):
            sampling = gen_lib.SamplingConfig(max_new_tokens=n, temperature=temperature, top_p=top_p)

            def lower(counts, bucket=bucket, sampling=sampling):
                tc, cfg = _twin(c, geo.cfg, counts, "")
                if counts is not None:
                    sampling = dataclasses.replace(sampling, max_new_tokens=counts["new_tokens"])
                model = settings.model_module(tc, cfg)
                shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, geo.dtype), state_lib.param_shapes(model))
                params = abstract_with_shardings(shapes, param_shardings(model, mesh, rules))
                pcfg = prompts.PromptConfig(batch_size=batch_size, image_token_id=cfg.image_token_id,
                                            image=image_lib.for_model(cfg, c.eval.min_pixels, c.eval.max_pixels))
                batch = prompts.collate_prompts([], bucket, pcfg)
                batch = sharding.abstract_batch({k: batch[k] for k in gen_lib.DEVICE_KEYS if k in batch}, mesh, rules)
                return gen_lib.Generator(model, params, mesh, rules).lower(batch, sampling)

            dims, base = _dims(geo.cfg)
            dims["new_tokens"] = n
            flops = flops_lib.generate_flops(geo.cfg, batch_size, bucket[0], [bucket[1]], n)
            out.append(Program(f"{kind}_{n}tok" if len(set(new_tokens)) > 1 else kind, name, bucket, lower, dims,
                               flops, resident, base=base))
    return out


def state_bytes_per_chip(c, geo: Geometry, mesh, rules) -> int:
    """Bytes per chip of a training state's optimizer moments (held while generation runs inside training)."""
    prog = program_lib.build(c, geo.cfg, mesh, rules)
    state = prog.abstract_state()
    return sum(_nbytes(x) for x in jax.tree.leaves(state.opt_state))


def _nbytes(x) -> int:
    n = x.dtype.itemsize
    for d in x.sharding.shard_shape(x.shape):
        n *= d
    return n


def programs(c, workdir: str, mesh, rules, buckets: str = "all") -> list[Program]:
    """Every program the run `c` compiles (each stage of a recipe), lowered on demand."""
    chained: dict[str, Geometry] = {}
    out: list[Program] = []
    for name, sc in stage_configs(c, workdir):
        check_settings(sc, mesh.size)
        os.makedirs(os.path.join(workdir, name), exist_ok=True)
        stage = StageContext(sc, os.path.join(workdir, name), mesh, rules, ModelSource.of(sc, "model"),
                             ModelSource.of(sc, "teacher", required=False))
        vocab = stage.vocab_ids if stage.model.kind == "preset" else None  # a checkpoint's: from its geometry
        student = _source(sc, stage.model, chained, workdir, vocab)
        # the teacher's geometry where a compiled program holds it: the online KD teacher, the RCT stage's corrector
        needs_teacher = (sc.stage == "kd" and not sc.kd.pseudo_labels) or sc.stage == "rct"
        has_teacher = needs_teacher and stage.teacher is not None
        teacher = _source(sc, stage.teacher, chained, workdir, student.cfg.vocab_ids) if has_teacher else None
        e, r = sc.eval, sc.rct
        greedy_eval = e.sasg_temperature if e.sasg_samples > 1 else e.temperature
        eval_top_p = e.sasg_top_p if e.sasg_samples > 1 else e.top_p
        eval_tokens = tuple(e.max_new_tokens_mii if t == "MII" else e.max_new_tokens for t in e.tasks)
        eval_batch = e.batch_size * max(1, e.sasg_samples)
        if sc.stage in ("sft", "kd"):
            out += train_programs(name, sc, student, teacher, mesh, rules, buckets)
            during = []
            if sc.eval.every_steps > 0:
                during.append(("generate_eval", eval_batch, e.text_buckets, e.patch_buckets, eval_tokens, greedy_eval,
                               eval_top_p))
            if sc.rct.every_steps > 0:
                during.append(("generate_rct", r.batch_size, sc.data.text_buckets, sc.data.patch_buckets,
                               (r.max_new_tokens,), 0.0, 1.0))
            if during:
                held = state_bytes_per_chip(sc, student, mesh, rules)
                for kind, *args in during:
                    out += generate_programs(name, kind, sc, student, mesh, rules, buckets, *args, resident=held)
            chained[name] = dataclasses.replace(student, dtype=sc.model.param_dtype)
        elif sc.stage == "eval":
            if not e.predictions:
                out += generate_programs(name, "generate_eval", sc, student, mesh, rules, buckets, eval_batch,
                                         e.text_buckets, e.patch_buckets, eval_tokens, greedy_eval, eval_top_p)
        elif sc.stage == "rct":
            out += generate_programs(name, "generate_rct", sc, student, mesh, rules, buckets, r.batch_size,
                                     sc.data.text_buckets, sc.data.patch_buckets, (r.max_new_tokens,), 0.0)
            if teacher is not None:
                out += generate_programs(name, "generate_rct_corrector", sc, teacher, mesh, rules, buckets,
                                         r.batch_size * r.samples, sc.data.text_buckets, sc.data.patch_buckets,
                                         (r.max_new_tokens,), r.temperature, r.top_p)
    return out


def estimate(prog: Program, cost_of: Callable[[object], dict]) -> dict[str, float]:
    """XLA's cost analysis of one call of `prog` at its real depths and lengths, from loop-free twins:
    cost = a + sum_d b_d (n_d - m_d) over the towers' depths (twins at m_d and m_d + 1: `prog.base`, default 1),
    plus (new tokens - 1) decode steps whose cost grows with the LLM's layers; for each of "flops", "bytes
    accessed" and "optimal_seconds" (`report.cost`). "optimal_seconds" is NaN when a twin's is (an operation XLA
    could not price)."""
    small, seen = {d: prog.base.get(d, 1) for d in prog.dims}, {}

    def at(**changes):
        counts = {**small, **changes}
        key = tuple(sorted(counts.items()))
        if key not in seen:
            seen[key] = cost_of(prog.lower(counts))
        return seen[key]

    def combine(key):
        base = at()[key]
        total = base
        for d, n in prog.dims.items():
            if d != "new_tokens" and n > small[d]:
                total += (n - small[d]) * (at(**{d: small[d] + 1})[key] - base)
        steps = prog.dims.get("new_tokens", 1) - 1
        if steps > 0:
            one_step = at(new_tokens=2)[key] - base
            more = small["layers"] + 1
            per_layer = (at(new_tokens=2, layers=more)[key] - at(layers=more)[key]) - one_step
            total += steps * (one_step + (prog.dims["layers"] - small["layers"]) * per_layer)
        return total

    return {key: combine(key) for key in ("flops", "bytes accessed", "optimal_seconds")}
