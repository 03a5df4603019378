"""The training run: config -> mesh -> data -> model (+ teacher) -> jitted step -> loop -> checkpoints.

Resumes exactly from the latest checkpoint in `<workdir>/checkpoints` (train state and the data
iterator's state), saves on SIGTERM (preemptible TPU VMs), stops on a non-finite loss with the step
number (the last good checkpoint is kept), and writes `metrics.jsonl`, TensorBoard events and
`loss.png` to the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from clinkd_jax import checkpoint, sharding
from clinkd_jax.convert import hf
from clinkd_jax.data import demo, pipeline, records, text, vocab as vocab_lib
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.models import config as model_config
from clinkd_jax.models.qwen2vl import Qwen2VL, abstract_params, init_params
from clinkd_jax.train import rct, state as state_lib, steps
from clinkd_jax.train.config import kd_config, validate
from clinkd_jax.train.report import MetricsWriter

log = logging.getLogger("clinkd_jax.train")
HOST_ONLY = ("index", "sample_mask", "decode_offsets", "record_index")


class NonFiniteLoss(FloatingPointError):
    pass


def config_of(src, vocab_ids=None) -> model_config.Qwen2VLConfig:
    """The model geometry named by src.hf_dir | src.orbax_dir | src.preset (+ text_overrides, + a compact
    vocabulary `vocab_ids` for a preset); no weights read."""
    if src.hf_dir:
        return model_config.Qwen2VLConfig.from_hf_dir(src.hf_dir)
    if src.orbax_dir:
        return checkpoint.load_config(src.orbax_dir)
    cfg = model_config.PRESETS[src.preset]()
    overrides = src.get("text_overrides")
    if overrides:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.to_dict().items()}
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, **fields))
    return cfg if vocab_ids is None else vocab_lib.compact_config(cfg, vocab_ids)


def load_model(src, mesh, seed: int, vocab_ids=None):
    """(Qwen2VLConfig, params) from src.hf_dir | src.orbax_dir | src.preset (random init, seeded)."""
    dtype = None if src.get("param_dtype", "") in ("", None) else src.param_dtype
    if src.hf_dir:
        return hf.load_hf_checkpoint(src.hf_dir, mesh=mesh, dtype=dtype)
    if src.orbax_dir:
        return checkpoint.load_params(src.orbax_dir, mesh=mesh, dtype=dtype)
    cfg = config_of(src, vocab_ids)
    return cfg, init_params(Qwen2VL(cfg, param_dtype=dtype or "float32"), jax.random.key(seed), mesh)


def same_vocab(cfg, other, what: str) -> None:
    if cfg.vocab_ids != other.vocab_ids:
        n = lambda x: "the full vocabulary" if x.vocab_ids is None else f"a compact vocabulary of {len(x.vocab_ids)} ids"
        raise ValueError(f"{what} has {n(other)} but the model has {n(cfg)}: token ids would not line up")


def demo_root(c, workdir) -> str:
    """The embedded demo set (data.format "demo"): data.demo_dir or <workdir>/demo_data, generated if needed."""
    return demo.ensure(c.data.get("demo_dir") or os.path.join(workdir, "demo_data"),
                       train_per_image=c.data.get("demo_train_per_image", 6),
                       test_per_image=c.data.get("demo_test_per_image", 2))


def training_records(c, workdir, log_) -> list:
    """The run's training records (demo data generated into <workdir>/demo_data when absent)."""
    d = c.data
    if d.format == "demo":
        root = demo_root(c, workdir)
        return records.read_medgrit(os.path.join(root, "train.json"), os.path.join(root, "images"), log=log_)
    reader = records.read_medgrit if d.format == "medgrit" else records.read_sharegpt
    return [r for f in d.train_files for r in reader(f, d.image_dir, log=log_)]


def tokenizer_dir(c) -> str:
    """data.tokenizer, else the model's HF directory, else tokenizer files kept with an Orbax checkpoint,
    else the bundled Qwen2 tokenizer."""
    if c.data.tokenizer:
        return c.data.tokenizer
    if c.model.hf_dir:
        return c.model.hf_dir
    assets = os.path.join(c.model.orbax_dir, "hf_assets") if c.model.orbax_dir else ""
    if assets and os.path.isfile(os.path.join(assets, "tokenizer.json")):
        return assets
    return text.bundled_qwen2_tokenizer_dir()


def compact_vocab(c, workdir) -> tuple[int, ...] | None:
    """The vocabulary ids `model.compact_vocab` asks for (None: full); only a preset model is compacted.
    "data": every id the training records and the eval test files encode to (clinkd_jax.data.vocab)."""
    want = c.model.get("compact_vocab", "")
    if not want or not c.model.preset:
        return None
    tok = text.load_tokenizer(tokenizer_dir(c))
    if want != "data":
        with open(want) as f:
            return vocab_lib.build_ids(tok, json.load(f))
    from clinkd_jax.eval import run as eval_run  # its test files; imported here (eval imports this module)

    quiet = records.SkipLog(strict=False)  # the stage's own reading reports skips
    has_train = c.data.format == "demo" or any(c.data.train_files)  # an eval-only config may have none
    recs = (training_records(c, workdir, quiet) if has_train else []) + [
        r for f in eval_run.test_files(c, workdir).values() if os.path.isfile(f)
        for r in records.read_medgrit(f, eval_run.image_dir(c, workdir), log=quiet)]
    encoder = text.ChatEncoder(tok, c.data.chat_template or None)
    used = {int(i) for r in recs for i in encoder.encode(r.turns, [1] * len(r.images)).input_ids}
    ids = vocab_lib.build_ids(tok, used)
    log.info("compact vocabulary: %d ids (%d used by %d records)", len(ids), len(used), len(recs))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "vocab_ids.json"), "w") as f:
            json.dump(list(ids), f)
    return ids


def build_data(c, workdir, vocab_ids=None):
    """(records, encoder, pipeline config, skip log); the encoder reads and writes `vocab_ids` rows."""
    d = c.data
    log_ = records.SkipLog(strict=d.strict)
    recs = training_records(c, workdir, log_)
    if d.get("extra_files"):
        recs = with_extra(recs, d.extra_files, d.extra_mode, log_)
    encoder = text.ChatEncoder(vocab_lib.tokenizer_for(text.load_tokenizer(tokenizer_dir(c)), vocab_ids),
                               d.chat_template or None)
    per_host = d.batch_size // jax.process_count()
    pcfg = pipeline.PipelineConfig(
        batch_size=per_host, text_buckets=tuple(d.text_buckets), patch_buckets=tuple(d.patch_buckets),
        image=ImageConfig(min_pixels=d.min_pixels, max_pixels=d.max_pixels), mrope_gaps=tuple(d.mrope_gaps),
        seed=c.seed, shuffle=d.shuffle, num_epochs=d.num_epochs or None, worker_count=d.worker_count,
        read_threads=d.read_threads, strict=d.strict, shard_index=jax.process_index(), shard_count=jax.process_count(),
        teacher_mrope_gaps=(1, 1) if c.stage == "kd" and c.teacher.positions == "own" else None,
        pseudo_labels=(c.kd.pseudo_labels or None) if c.stage == "kd" else None,
        image_token_id=encoder.image_pad_id, pad_token_id=encoder.pad_id,
    )
    return recs, encoder, pcfg, log_


def with_extra(recs: list, files, mode: str, log_) -> list:
    """The training pool plus the records of `files` (ShareGPT, e.g. RCT corrections), appended, or
    replacing the records with the same id (mode "replace")."""
    extra = [r for f in files for r in records.read_sharegpt(f, "", log=log_)]
    if mode == "replace":
        corrected = {r.id for r in extra}
        recs = [r for r in recs if r.id not in corrected]
    log.info("training pool: %d records incl. %d from %s (%s)", len(recs) + len(extra), len(extra), list(files), mode)
    return recs + extra


def make_run_mesh(c):
    """(mesh, logical rules) from config.mesh; a smaller explicit mesh uses the first devices."""
    shape = tuple(c.mesh.shape)
    n_mesh = int(np.prod(shape)) if -1 not in shape else jax.device_count()
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:n_mesh])
    rules = tuple(tuple(r) for r in c.mesh.rules) if c.mesh.get("rules") else sharding.DEFAULT_RULES
    return mesh, rules


def to_global(batch: dict, mesh) -> dict:
    """Host-local NumPy batch -> global jax.Arrays sharded over the batch axes."""
    out = {}
    batch_axes = sharding.logical_to_spec(("batch",), (batch["input_ids"].shape[0] * jax.process_count(),),
                                          dict(mesh.shape), sharding.DEFAULT_RULES)[0]
    for k, v in batch.items():
        if k in HOST_ONLY:
            continue
        spec = P(None, batch_axes) if k.endswith("position_ids") and v.ndim == 3 and k != "vision_position_ids" else P(batch_axes)
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v)
    return out


def run(c, workdir: str) -> dict:
    """Train as `c` says; returns a summary (final metrics, steps, skips, paths)."""
    validate(c)
    os.makedirs(workdir, exist_ok=True)
    mesh, rules = make_run_mesh(c)
    cfg, params = load_model(c.model, mesh, c.seed, compact_vocab(c, workdir))
    model = Qwen2VL(cfg, dtype=c.model.dtype, param_dtype=c.model.param_dtype, attention_impl=c.model.attention,
                    remat=c.model.remat)
    teacher = teacher_params = None
    if c.stage == "kd" and not c.kd.pseudo_labels:
        t_cfg, teacher_params = load_model(c.teacher, mesh, c.seed + 1, cfg.vocab_ids)
        same_vocab(cfg, t_cfg, "the teacher")
        teacher = Qwen2VL(t_cfg, dtype=c.teacher.dtype, attention_impl=c.model.attention)
    recs, encoder, pcfg, skips = build_data(c, workdir, cfg.vocab_ids)
    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.save_every,
                                        keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    in_run = rct.InRun(c, workdir) if c.stage == "sft" and c.rct.every_steps > 0 else None
    pool = lambda step: with_extra(recs, in_run.files_by(step), c.data.extra_mode, skips) if in_run else recs
    data = pipeline.make_batches(pool(ckpt.latest_step() or 0), encoder, pcfg, skips)

    opt = state_lib.OptimConfig(
        learning_rate=c.optim.learning_rate, schedule=c.optim.schedule, warmup_steps=c.optim.warmup_steps,
        total_steps=_total_updates(c, len(recs)), end_lr_ratio=c.optim.end_lr_ratio, b1=c.optim.b1, b2=c.optim.b2,
        eps=c.optim.eps, weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip, grad_accum=c.optim.grad_accum,
        frozen=tuple(c.optim.frozen),
    )
    tx = state_lib.optimizer_for(model, opt)
    st_sh = state_lib.state_shardings(model, tx, mesh, rules)
    t_sh = None if teacher is None else sharding.tree_shardings(abstract_params(teacher), mesh, rules)
    with sharding.use_mesh(mesh, rules):
        restored = ckpt.restore(checkpoint.abstract_with_shardings(state_lib.abstract_state(model, tx), st_sh))
        if restored is None:
            state = jax.jit(functools.partial(state_lib.create, tx=tx), out_shardings=st_sh)(params)
            start = 0
        else:
            start, state, data_state = restored
            data.set_state(own_data_state(data_state))
            log.info("resumed from step %d", start)
        del params
        sched = state_lib.schedule(opt)
        step_fn = steps.jit_train_step(
            st_sh, t_sh, None, model=model, tx=tx, teacher=teacher,
            kd=kd_config(c) if c.stage == "kd" else None, chunk=c.train.loss_chunk,
            teacher_positions=c.teacher.positions, lr_schedule=lambda s: sched(s // opt.grad_accum), frozen=opt.frozen,
        )
        writer = MetricsWriter(workdir, resume_from=start, progress=c.train.progress and jax.process_index() == 0,
                               total=None if c.train.steps < 0 else c.train.steps)
        stop = {"signal": None}
        previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
        step, metrics, t0 = start, {}, time.perf_counter()
        try:
            while c.train.steps < 0 or step < c.train.steps:
                batch = next(data, None)
                if batch is None:
                    break
                state, metrics = step_fn(state, teacher_params, to_global(batch, mesh))
                step += 1
                rct_now = in_run is not None and step in in_run.at
                saving = ckpt.manager.should_save(step) or rct_now  # a resume must see the grown pool
                if step % c.train.log_every == 0 or step == c.train.steps or saving:
                    metrics = jax.tree.map(float, metrics)  # a host sync; never save a state without this check
                    if not math.isfinite(metrics["loss"]):
                        raise NonFiniteLoss(f"non-finite loss {metrics['loss']} at step {step}; the last good "
                                            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
                if step % c.train.log_every == 0 or step == c.train.steps:
                    tokens = metrics["tokens"] * jax.process_count()
                    metrics["tokens_per_s"] = tokens * c.train.log_every / max(time.perf_counter() - t0, 1e-9)
                    t0 = time.perf_counter()
                    writer.write(step, metrics)
                if rct_now:  # a correction round with the current params; the pool grows from the next step
                    gen_model = Qwen2VL(cfg, dtype=c.model.dtype, attention_impl=c.model.attention)
                    in_run.run_round(step, state.params, gen_model, mesh, rules, recs, encoder)
                    data = pipeline.make_batches(pool(step), encoder, pcfg, skips)
                    t0 = time.perf_counter()  # the round's time is not training throughput
                if saving:
                    ckpt.save(step, state, host_data_states(data), c.to_dict(), force=rct_now)
                if stop["signal"] is not None:
                    log.warning("signal %s: saving step %d and stopping", stop["signal"], step)
                    break
            if ckpt.latest_step() != step:
                if metrics and not math.isfinite(float(metrics["loss"])):
                    raise NonFiniteLoss(f"non-finite loss at step {step}; the last good checkpoint is step "
                                        f"{ckpt.latest_step()} in {ckpt.directory}")
                ckpt.save(step, state, host_data_states(data), c.to_dict(), force=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
            ckpt.close()
            writer.close()
    if c.checkpoint.save_params:
        checkpoint.save_params(os.path.join(workdir, "params"), state.params, cfg)
    if c.checkpoint.export_hf:
        hf.save_hf_checkpoint(state.params, cfg, os.path.join(workdir, "export_hf"),
                              assets_from=c.model.hf_dir or None)
    summary = {"stage": c.stage, "steps": step, "start_step": start, "final": metrics,
               "skipped": dict(skips.counts), "workdir": workdir, "preempted": stop["signal"] is not None,
               **({"rct": in_run.rounds} if in_run else {})}
    if jax.process_index() == 0:  # one writer per shared workdir
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return {**summary, "state": state}


def host_data_states(data) -> dict:
    """Every host's data-iterator state (each reads its own slice), gathered for the checkpoint."""
    from clinkd_jax.distributed import allgather_json

    return {"per_host": allgather_json(data.get_state())}


def own_data_state(saved: dict) -> dict:
    if "per_host" not in saved:  # written by a single-process run before per-host states existed
        return saved
    hosts = saved["per_host"]
    if len(hosts) != jax.process_count():
        raise ValueError(f"the checkpoint holds data states of {len(hosts)} hosts, this run has "
                         f"{jax.process_count()}: resume with the same number of hosts (the model state alone "
                         "restores anywhere)")
    return hosts[jax.process_index()]


def _total_updates(c, n_records: int) -> int:
    if c.train.steps > 0:
        micro = c.train.steps
    elif c.data.num_epochs:
        micro = math.ceil(n_records / c.data.batch_size) * c.data.num_epochs
    else:
        micro = c.train.total_steps_hint * c.optim.grad_accum
    return max(1, micro // c.optim.grad_accum)
