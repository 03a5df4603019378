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

import jax
import numpy as np

from clinkd_jax import checkpoint, distributed, files, run_setup, sharding
from clinkd_jax.convert import hf
from clinkd_jax.data import pipeline, records
from clinkd_jax.models.config import Qwen2VLConfig
from clinkd_jax.train import program
from clinkd_jax.train import state as state_lib
from clinkd_jax.train.config import ConfigError, validate
from clinkd_jax.train.report import MetricsWriter

log = logging.getLogger("clinkd_jax.train")


class NonFiniteLoss(FloatingPointError):
    pass


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a step-end hook may use of the running stage."""

    cfg: Qwen2VLConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    records: list
    encoder: object


def batches(c, workdir, recs, encoder, model_cfg, mesh, rules, pool_files=(), skips=None):
    """The batch iterator over `recs` plus data.extra_files plus `pool_files` (RCT corrections); `skips`
    holds what reading `recs` skipped (counted in the run's summary)."""
    skips = skips or records.SkipLog(strict=c.data.strict)
    extra = tuple(c.data.extra_files) + tuple(pool_files)
    pool = run_setup.with_extra(recs, extra, c.data.extra_mode, skips) if extra else recs
    return pipeline.make_batches(pool, encoder, run_setup.pipeline_config(c, encoder, model_cfg, mesh, rules), skips,
                                 sizes_cache=run_setup.sizes_cache(c, workdir))


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


def run(c, workdir: str, hooks=()) -> dict:
    """Train as `c` says, calling the step-end `hooks`; returns a summary (final metrics, steps, skips, paths)."""
    validate(c)
    if c.rct.every_steps > 0 and not hooks:  # the rounds would silently not happen
        raise ConfigError("rct.every_steps: in-run RCT rounds are a step-end hook; run the stage with "
                          "clinkd_jax.recipe.run_stage (as clinkd_jax.main does)")
    os.makedirs(workdir, exist_ok=True)
    mesh, rules = run_setup.make_run_mesh(c)
    cfg, params = run_setup.load_model(c.model, mesh, rules, c.seed, run_setup.compact_vocab(c, workdir),
                                         c.model.param_dtype)
    t_cfg = teacher_params = None
    if c.stage == "kd" and not c.kd.pseudo_labels:
        t_cfg, teacher_params = run_setup.load_model(c.teacher, mesh, rules, c.seed + 1, cfg.vocab_ids)
        run_setup.same_inputs(cfg, t_cfg, "the teacher")
    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.save_every,
                                        keep=c.checkpoint.keep, async_save=c.checkpoint.async_save,
                                        commit_files=c.checkpoint.commit_files)
    start = ckpt.latest_step() or 0

    def pool_files(step):
        return [f for h in hooks for f in h.pool_files(step)]

    read_skips = records.SkipLog(strict=c.data.strict)
    recs = run_setup.training_records(c, workdir, read_skips)
    encoder = run_setup.encoder_for(c, cfg.vocab_ids)
    data = batches(c, workdir, recs, encoder, cfg, mesh, rules, pool_files(start), read_skips)

    prog = program.build(c, cfg, mesh, rules, teacher_cfg=t_cfg, total_updates=_total_updates(c, data))
    with sharding.use_mesh(mesh, rules):
        restored = ckpt.restore(prog.abstract_state())
        if restored is None:
            state = jax.jit(functools.partial(state_lib.create, tx=prog.tx), out_shardings=prog.state_shardings)(params)
        else:
            latest, (start, state, data_state) = start, restored
            if start != latest and hooks:  # the latest step was damaged: the pool as it was at the step read
                data = batches(c, workdir, recs, encoder, cfg, mesh, rules, pool_files(start), read_skips)
            data.set_state(data_state)
            for h in hooks:
                h.resume(start)
            log.info("resumed from step %d (epoch %d, batch %d of %d)", start, data.epoch, data.batch,
                     data.batches_per_epoch)
        del params
        step_fn = prog.step
        writer = MetricsWriter(workdir, resume_from=start, progress=c.train.progress and jax.process_index() == 0,
                               total=None if c.train.steps < 0 else c.train.steps)
        stop = StopSignal()
        step, metrics, t0 = start, writer.resumed, time.perf_counter()  # a run resumed at its end keeps its last
        shapes = set()  # batch shapes met so far: the step compiles once for each, never again
        try:
            while c.train.steps < 0 or step < c.train.steps:
                batch = next(data, None)
                if batch is None:
                    break
                shape = tuple((k, np.shape(v)) for k, v in sorted(batch.items()))
                if shape not in shapes:
                    shapes.add(shape)
                    named = ", ".join(f"{k} {np.shape(batch[k])}" for k in ("input_ids", "pixel_values") if k in batch)
                    log.info("step %d: a new batch shape (%s); the step compiles for it once", step + 1, named)
                state, metrics = step_fn(state, teacher_params,
                                         run_setup.device_batch(batch, mesh, rules, c.data.batch_size))
                step += 1
                due = [h for h in hooks if h.due(step)]
                grows = any(h.changes_pool for h in due)
                preempted = stop(step)  # every host answers the same at the same step
                saving = ckpt.manager.should_save(step) or grows or preempted  # a resume must see the grown pool
                if step % c.train.log_every == 0 or step == c.train.steps or saving:
                    metrics = jax.tree.map(float, metrics)  # a host sync; never save a state without this check
                    if not math.isfinite(metrics["loss"]):
                        raise NonFiniteLoss(f"non-finite loss {metrics['loss']} at step {step}; the last good "
                                            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
                if step % c.train.log_every == 0 or step == c.train.steps:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    metrics["tokens_per_s"] = metrics["tokens"] * c.train.log_every / elapsed
                    metrics["epoch"] = data.epoch + data.batch / data.batches_per_epoch
                    t0 = time.perf_counter()
                    writer.write(step, metrics)
                for h in due:  # e.g. a correction round with the current params
                    h(step, state.params, HookContext(cfg, mesh, rules, recs, encoder))
                if grows:  # the pool grows from the next step
                    old = data
                    data = batches(c, workdir, recs, encoder, cfg, mesh, rules, pool_files(step))
                    data.set_state({"epoch": old.epoch, "batch": old.batch})  # the stream goes on, not epoch 0
                    data.load_skips.update(old.load_skips)
                if due:
                    t0 = time.perf_counter()  # the hooks' time is not training throughput
                if saving:
                    ckpt.save(step, state, data.get_state(), c.to_dict(), force=grows or preempted)
                if preempted:
                    log.warning("SIGTERM: saved step %d; stopping (run the same command to resume)", step)
                    break
            if ckpt.latest_step() != step:
                if metrics and not math.isfinite(float(metrics["loss"])):
                    raise NonFiniteLoss(f"non-finite loss at step {step}; the last good checkpoint is step "
                                        f"{ckpt.latest_step()} in {ckpt.directory}")
                ckpt.save(step, state, data.get_state(), c.to_dict(), force=True)
        finally:
            stop.close()
            ckpt.close()
            writer.close(failing=sys.exc_info()[0] is not None)  # an exception on its way out
    preempted = stop.received is not None
    if not preempted and c.checkpoint.save_params:
        checkpoint.save_params(os.path.join(workdir, "params"), state.params, cfg,
                               assets_from=run_setup.tokenizer_dir(c), chat_template=encoder.template)
        checkpoint.write_answer_settings(os.path.join(workdir, "params"), run_setup.answer_settings(c))
    if not preempted and c.checkpoint.export_hf:
        hf.save_hf_checkpoint(state.params, cfg, os.path.join(workdir, "export_hf"), dtype=c.checkpoint.export_dtype,
                              assets_from=run_setup.tokenizer_dir(c), chat_template=encoder.template)
        checkpoint.write_answer_settings(os.path.join(workdir, "export_hf"), run_setup.answer_settings(c))
    summary = {"stage": c.stage, "steps": step, "start_step": start, "final": metrics,
               "skipped": data.skips_all_hosts(), "workdir": workdir, "preempted": preempted,
               "epochs": data.epoch + data.batch / data.batches_per_epoch, "batch_shapes": len(shapes),
               **{k: v for h in hooks for k, v in h.summary().items()}}
    if jax.process_index() == 0:  # one writer per shared workdir
        files.write_json(os.path.join(workdir, "summary.json"), summary, default=float)
    return {**summary, "state": state}


def _total_updates(c, data) -> int:
    """Optimizer updates the learning-rate schedule spans."""
    if c.train.steps > 0:
        micro = c.train.steps
    elif c.data.num_epochs:
        micro = data.batches_per_epoch * c.data.num_epochs
    else:
        micro = c.train.total_steps_hint * c.optim.grad_accum
    return max(1, micro // c.optim.grad_accum)
