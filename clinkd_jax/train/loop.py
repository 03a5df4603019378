"""The training run: config -> mesh -> data -> model (+ teacher) -> jitted step -> loop -> checkpoints.

Resumes exactly from the latest checkpoint in `<workdir>/checkpoints` (train state and the data
iterator's (epoch, batch), the same on every host), saves on SIGTERM (preemptible TPU VMs; on a pod,
every host stops at the same step), stops on a non-finite loss with the step number (the last good
checkpoint is kept), and writes `metrics.jsonl`, TensorBoard events and `loss.png` to the workdir.
At the end, `<workdir>/params` (with the tokenizer and chat template in hf_assets/: a later stage's
model or teacher) and optionally `<workdir>/export_hf` (the Hugging Face layout).

Step-end hooks (`run(..., hooks=)`; in-run RCT, `clinkd_jax.train.rct.InRun`, is one) let a stage act
between steps without the loop knowing it. A hook has
    due(step) -> bool                  act after this step
    __call__(step, params, run)        act; `run` is a `HookContext`
    changes_pool: bool                 whether acting adds training files (then a checkpoint is saved right
                                       after, and the data stream goes on over the grown pool)
    pool_files(step) -> list[str]      training files it has added to the pool by `step` (ShareGPT)
    resume(step)                       the run resumed at `step`
    summary() -> dict                  merged into the run's summary
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from clinkd_jax import checkpoint, distributed, files, hf_checkpoint, peft_adapters, sharding
from clinkd_jax.data import dataset, pipeline, records
from clinkd_jax.model_source import ModelSource
from clinkd_jax.models import lora as lora_lib
from clinkd_jax.models import quant
from clinkd_jax.models.config import Qwen2VLConfig
from clinkd_jax.stage import StageContext
from clinkd_jax.train import program
from clinkd_jax.train import state as state_lib
from clinkd_jax.train.config import ConfigError, validate
from clinkd_jax.train.report import MetricsWriter

log = logging.getLogger("clinkd_jax.train")


class NonFiniteLoss(FloatingPointError):
    pass


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a step-end hook may use of the running stage: its context, the model's geometry, its records."""

    stage: StageContext
    cfg: Qwen2VLConfig
    records: list


def batches(stage: StageContext, recs, model_cfg, pool_files=(), skips=None):
    """The batch iterator over `recs` plus data.extra_files plus `pool_files` (RCT corrections); `skips`
    holds what reading `recs` skipped (counted in the run's summary)."""
    c, pcfg = stage.c, stage.pipeline_config(model_cfg)
    skips = skips or records.SkipLog(strict=c.data.strict)
    extra = tuple(c.data.extra_files) + tuple(pool_files)
    pool = dataset.with_extra(recs, extra, c.data.extra_mode, skips) if extra else recs
    return pipeline.make_batches(pool, stage.encoder, pcfg, skips, sizes_cache=dataset.sizes_cache(c, stage.workdir))


class StopSignal:
    """SIGTERM (preemptible VMs): every host stops at the same step. Multi-process runs use JAX's
    preemption sync service (its handler is installed by jax.distributed; a Python handler would replace
    it); a single process catches the signal itself."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.received = None
        self._previous = None if self.multi else signal.signal(signal.SIGTERM, self._catch)

    def _catch(self, signum, _frame):
        self.received = signum

    def __call__(self, step: int) -> bool:
        if self.multi and distributed.preemption_point(step):
            self.received = signal.SIGTERM
        return self.received is not None

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Training:
    """One stage's training: what is set up once (mesh, models, records, program, checkpoints) and where it
    stands (state, step, the last metrics, the batch shapes met)."""

    stage: StageContext
    hooks: tuple
    cfg: Qwen2VLConfig
    teacher_params: Any
    ckpt: checkpoint.TrainCheckpointer
    recs: list
    read_skips: records.SkipLog
    data: Any = None
    prog: program.TrainProgram | None = None
    state: Any = None
    start: int = 0
    step: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)
    shapes: set = dataclasses.field(default_factory=set)  # (program, batch shape) met: each compiles once
    base: tuple = ()  # (a LoRA model's frozen base params,): the step's last argument; () without LoRA

    @property
    def c(self):
        return self.stage.c

    @property
    def workdir(self) -> str:
        return self.stage.workdir

    def model_params(self):
        """The trained model's params as the plain model reads them: with LoRA, the base with the adapters
        folded in (what hooks, params/ and export_hf/ get)."""
        return self._fold(self.base[0], self.state.params) if self.base else self.state.params

    @functools.cached_property
    def _fold(self):  # compiled once per run, not once per hook call
        return lora_lib.folder(self.prog.lora, self.prog.plain_shardings, self.prog.base_quant)

    @functools.cached_property
    def base_digest(self) -> list[float]:
        return lora_lib.base_digest(self.base[0]) if self.base else []  # the base never changes in a run

    def saved(self) -> dict:
        """What a checkpoint keeps beside the state: the data's position and, with LoRA, the base's digest."""
        return self.data.get_state() | ({"lora_base": self.base_digest} if self.base else {})

    def batches(self, step: int, skips=None):
        """The batch iterator over the records and the files the hooks had added by `step`."""
        pool = [f for h in self.hooks for f in h.pool_files(step)]
        return batches(self.stage, self.recs, self.cfg, pool, skips)


def run(c, workdir: str, hooks=()) -> dict:
    """Train as `c` says, calling the step-end `hooks`; returns a summary (final metrics, steps, skips, paths)."""
    validate(c)
    if c.rct.every_steps > 0 and not hooks:  # the rounds would silently not happen
        raise ConfigError("rct.every_steps: in-run RCT rounds are a step-end hook; run the stage with "
                          "clinkd_jax.recipe.run_stage (as clinkd_jax.main does)")
    os.makedirs(workdir, exist_ok=True)
    stage = StageContext.of(c, workdir)
    with sharding.use_mesh(stage.mesh, stage.rules):
        t, params = _set_up(stage, tuple(hooks))
        _restore_or_init(t, params)
        del params
        preempted = _train(t)
    return _finish(t, preempted)


def _set_up(stage: StageContext, hooks: tuple) -> tuple[_Training, Any]:
    """Student (and online teacher), checkpoints, records, data and the compiled step; the student's initial
    params (used unless a checkpoint is restored)."""
    c = stage.c
    cfg, params = stage.load_base(c.model.param_dtype)  # a LoRA run's base: the adapters train beside it
    t_cfg = teacher_params = None
    if c.stage == "kd" and not c.kd.pseudo_labels:
        t_cfg, teacher_params = stage.load_teacher(cfg)
    ckpt = checkpoint.TrainCheckpointer(os.path.join(stage.workdir, "checkpoints"),
                                        save_every=c.checkpoint.save_every, keep=c.checkpoint.keep,
                                        async_save=c.checkpoint.async_save, commit_files=c.checkpoint.commit_files)
    read_skips = records.SkipLog(strict=c.data.strict)
    recs = stage.training_records(read_skips)
    t = _Training(stage, hooks, cfg, teacher_params, ckpt, recs, read_skips, start=ckpt.latest_step() or 0)
    t.data = t.batches(t.start, read_skips)
    t.prog = program.build(c, cfg, stage.mesh, stage.rules, teacher_cfg=t_cfg, total_updates=_total_updates(c, t.data),
                           tokens=(stage.encoder.stop_ids, stage.encoder.pad_id))
    t.teacher_params = quant.quantizer(t.prog.teacher_quant, t.prog.teacher_shardings)(t.teacher_params)
    return t, params


def _restore_or_init(t: _Training, params) -> None:
    """The latest readable checkpoint (state, data position, the hooks' rounds), else a fresh state."""
    restored = t.ckpt.restore(t.prog.abstract_state())
    if t.prog.lora is not None:  # the loaded params are the frozen base; the state holds the adapters
        t.base = (quant.quantizer(t.prog.base_quant, t.prog.base_shardings)(params),)  # (lora.base_quant)
        params = None if restored else lora_lib.init_adapters(
            t.prog.model, jax.random.fold_in(jax.random.key(t.c.seed), 2), t.prog.state_shardings.params,
            start=t.prog.start_adapters)
    if restored is None:
        create = jax.jit(functools.partial(state_lib.create, tx=t.prog.tx), out_shardings=t.prog.state_shardings)
        t.state = create(params)
        return
    latest, (t.start, t.state, data_state) = t.start, restored
    if t.base and not lora_lib.same_base(data_state.get("lora_base", []), t.base_digest):
        raise ConfigError(f"{t.ckpt.directory}: its LoRA adapters were trained on another base than "
                          f"{ModelSource.of(t.c, 'model').describe()}; resume with the base they were trained on, or "
                          "start in a new workdir")
    if t.start != latest and t.hooks:  # the latest step was damaged: the pool as it was at the step read
        t.data = t.batches(t.start, t.read_skips)
    t.data.set_state(data_state)
    for h in t.hooks:
        h.resume(t.start)
    log.info("resumed from step %d (epoch %d, batch %d of %d)", t.start, t.data.epoch, t.data.batch,
             t.data.batches_per_epoch)


def _train(t: _Training) -> bool:
    """Steps until train.steps (or the data's end, or SIGTERM), then a checkpoint of the last step; whether the
    run was preempted."""
    c = t.c
    writer = MetricsWriter(t.workdir, resume_from=t.start, progress=c.train.progress and jax.process_index() == 0,
                           total=None if c.train.steps < 0 else c.train.steps)
    stop = StopSignal()
    t.step, t.metrics, clock = t.start, writer.resumed, time.perf_counter()  # resumed at its end: its last metrics
    try:
        while c.train.steps < 0 or t.step < c.train.steps:
            batch = next(t.data, None)
            if batch is None:
                break
            step = t.prog.step_for(t.step)
            on = step is t.prog.on_policy_step
            _note_shape(t, batch, on_policy=on)
            placed = t.stage.device_batch(batch, t.prog.samples)
            t.state, t.metrics = step(t.state, t.teacher_params, placed, *t.base)
            if t.prog.on_policy_step is not None:  # runs that have on-policy steps say which ones were
                t.metrics["on_policy"] = float(on)
            t.step += 1
            clock = _step_end(t, writer, stop, clock)
            if stop.received is not None:
                log.warning("SIGTERM: saved step %d; stopping (run the same command to resume)", t.step)
                break
        if t.ckpt.latest_step() != t.step:
            if t.metrics and not math.isfinite(float(t.metrics["loss"])):
                raise NonFiniteLoss(f"non-finite loss at step {t.step}; the last good checkpoint is step "
                                    f"{t.ckpt.latest_step()} in {t.ckpt.directory}")
            t.ckpt.save(t.step, t.state, t.saved(), c.to_dict(), force=True)
    finally:
        stop.close()
        t.ckpt.close()
        writer.close(failing=sys.exc_info()[0] is not None)  # an exception on its way out
    return stop.received is not None


def _note_shape(t: _Training, batch: dict, on_policy: bool) -> None:
    shape = (on_policy, *((k, np.shape(v)) for k, v in sorted(batch.items())))
    if shape not in t.shapes:
        t.shapes |= {shape}
        named = ", ".join(f"{k} {np.shape(batch[k])}" for k in ("input_ids", "pixel_values") if k in batch)
        log.info("step %d: a new batch shape (%s); the %sstep compiles for it once", t.step + 1, named,
                 "on-policy " if on_policy else "")


def _step_end(t: _Training, writer: MetricsWriter, stop: StopSignal, clock: float) -> float:
    """After a step: check the loss where it is read, log, run the hooks due (and grow the pool), save; returns
    the clock the next throughput figure counts from."""
    c, step = t.c, t.step
    due = [h for h in t.hooks if h.due(step)]
    grows = any(h.changes_pool for h in due)
    preempted = stop(step)  # every host answers the same at the same step
    saving = t.ckpt.manager.should_save(step) or grows or preempted  # a resume must see the grown pool
    logging_step = step % c.train.log_every == 0 or step == c.train.steps
    if logging_step or saving:
        t.metrics = jax.tree.map(float, t.metrics)  # a host sync; never save a state without this check
        if not math.isfinite(t.metrics["loss"]):
            raise NonFiniteLoss(f"non-finite loss {t.metrics['loss']} at step {step}; the last good "
                                f"checkpoint is step {t.ckpt.latest_step()} in {t.ckpt.directory}")
    if logging_step:
        t.metrics["tokens_per_s"] = t.metrics["tokens"] * c.train.log_every / max(time.perf_counter() - clock, 1e-9)
        t.metrics["epoch"] = t.data.epoch + t.data.batch / t.data.batches_per_epoch
        clock = time.perf_counter()
        writer.write(step, t.metrics)
    for h in due:  # e.g. a correction round with the current params
        h(step, t.model_params(), HookContext(t.stage, t.cfg, t.recs))
    if grows:  # the pool grows from the next step
        old, t.data = t.data, t.batches(step)
        t.data.set_state({"epoch": old.epoch, "batch": old.batch})  # the stream goes on, not epoch 0
        t.data.load_skips.update(old.load_skips)
    if due:
        clock = time.perf_counter()  # the hooks' time is not training throughput
    if saving:
        t.ckpt.save(step, t.state, t.saved(), c.to_dict(), force=grows or preempted)
    return clock


def _finish(t: _Training, preempted: bool) -> dict:
    """The trained params (and the Hugging Face export) unless preempted, and the run's summary."""
    c, template, assets = t.c, t.stage.encoder.template, t.stage.tokenizer_dir
    params = t.model_params() if not preempted and (c.checkpoint.save_params or c.checkpoint.export_hf) else None
    if not preempted and c.checkpoint.save_params:
        where = os.path.join(t.workdir, "params")
        checkpoint.save_params(where, params, t.cfg, assets_from=assets, chat_template=template,
                               side_files=checkpoint.answer_settings_file(c))
    if not preempted and c.checkpoint.export_hf:
        where = os.path.join(t.workdir, "export_hf")
        hf_checkpoint.save_hf_checkpoint(params, t.cfg, where, dtype=c.checkpoint.export_dtype, assets_from=assets,
                                         chat_template=template, side_files=checkpoint.answer_settings_file(c))
        if t.base:  # the adapters alone, for peft on transformers' model of the base
            peft_adapters.save_peft(os.path.join(t.workdir, "export_peft"), t.cfg, t.state.params, t.prog.lora,
                                    ModelSource.of(c, "model").describe())
    data = t.data
    summary = {"stage": c.stage, "steps": t.step, "start_step": t.start, "final": t.metrics,
               "skipped": data.skips_all_hosts(), "workdir": t.workdir, "preempted": preempted,
               "epochs": data.epoch + data.batch / data.batches_per_epoch, "batch_shapes": len(t.shapes),
               **{k: v for h in t.hooks for k, v in h.summary().items()}}
    if jax.process_index() == 0:  # one writer per shared workdir
        files.write_json(os.path.join(t.workdir, "summary.json"), summary, default=float)
    return {**summary, "state": t.state}


def _total_updates(c, data) -> int:
    """Optimizer updates the learning-rate schedule spans."""
    if c.train.steps > 0:
        micro = c.train.steps
    elif c.data.num_epochs:
        micro = data.batches_per_epoch * c.data.num_epochs
    else:
        micro = c.train.total_steps_hint * c.optim.grad_accum
    return max(1, micro // c.optim.grad_accum)
