"""Evaluation inside a training run (`eval.every_steps` > 0 on an sft or kd stage): a step-end hook of the
training loop (clinkd_jax.train.loop) that runs the BiRD/ClinKD protocol (eval.tasks, eval.limit items per
file) with the current parameters after every `every_steps` steps, so a run shows its grounding curve
while it trains, not only at the end.

    <workdir>/eval_during_training/step_<N>/   predictions/ and metrics.json of the evaluation at step N
    <workdir>/eval_curve.jsonl                 {"step": N, "VG": ..., "RO": ..., "GC": ..., "MII": ...} (×1)

Each line holds every task's 8-modality mean of its headline metric (Recall@0.5, accuracy, CIDEr, mBMR).
The generator compiles once and is reused with each step's parameters; the training data stream is not
touched. A resumed run keeps the curve up to the step it resumes at and evaluates the later steps again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax

from clinkd_jax import files, tracking
from clinkd_jax.data import records as records_lib
from clinkd_jax.eval import config as eval_config
from clinkd_jax.eval import run as eval_run
from clinkd_jax.eval.report import mean_value
from clinkd_jax.infer import generate as gen_lib
from clinkd_jax.models.config import ConfigError

log = logging.getLogger("clinkd_jax.eval")
CURVE = "eval_curve.jsonl"


class EvalDuringTraining:
    """The hook; `hooks(c, workdir)` builds it when the config asks for it."""

    changes_pool = False  # it reads the parameters only

    def __init__(self, c, workdir: str):
        if c.eval.predictions:
            raise ConfigError("eval.every_steps evaluates the model being trained; eval.predictions (score-only) "
                              "cannot go with it")
        eval_config.validate(c, workdir)  # test files, tasks, image folder: fail before anything compiles
        self.c, self.workdir, self.every = c, workdir, c.eval.every_steps
        self.generator = None
        self.curve: list[dict] = []

    @classmethod
    def hooks(cls, c, workdir: str) -> list:
        return [cls(c, workdir)] if c.stage in ("sft", "kd") and c.eval.every_steps > 0 else []

    def step_dir(self, step: int) -> str:
        return os.path.join(self.workdir, "eval_during_training", f"step_{step}")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def pool_files(self, step: int) -> list[str]:
        return []

    def resume(self, step: int) -> None:
        """Keep the evaluations up to `step`; later ones (a killed run's) are made again."""
        path = os.path.join(self.workdir, CURVE)
        self.curve = []
        # a line torn by a kill or a full disk mid-write is dropped: that evaluation runs again
        self.curve = [p for p in files.read_lines(path, _point, rewrite=False) if p["step"] <= step]
        if jax.process_index() == 0:
            files.write_text(path, "".join(json.dumps(p) + "\n" for p in self.curve))
            root = os.path.dirname(self.step_dir(0))
            for name in os.listdir(root) if os.path.isdir(root) else ():
                if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) > step:
                    shutil.rmtree(os.path.join(root, name))

    def summary(self) -> dict:
        return {"eval_curve": self.curve}

    def __call__(self, step: int, params, run) -> None:
        c, out = self.c, self.step_dir(step)
        if self.generator is None:  # compiled once, reused with each step's parameters
            self.generator = gen_lib.Generator(run.stage.module(run.cfg), params, run.stage.mesh, run.stage.rules)
        self.generator.params = params
        skips, read_skips = records_lib.SkipLog(strict=c.data.strict), records_lib.SkipLog(strict=c.data.strict)
        pred_files, generated = eval_run.predict_all(c, self.workdir, self.generator, run.stage.encoder, read_skips,
                                                     skips, out_dir=out)
        result = eval_run.scored(c, out, pred_files, generated, read_skips, skips, reports=False)
        point = {"step": step, **{t: mean_value(t, m) for t, m in result["means"].items()}}
        self.curve.append(point)
        log.info("evaluation at step %d: %s", step, format_point(point))
        tracking.active().log(step, {f"eval/{t}": 100 * v for t, v in point.items() if t != "step" and v is not None})
        if jax.process_index() == 0:
            with files.Lines(os.path.join(self.workdir, CURVE)) as f:
                f.write_json(point)


def _point(line: str) -> dict:
    point = json.loads(line)
    int(point["step"])  # a line without its step is unreadable too
    return point


def format_point(point: dict) -> str:
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in point.items() if k != "step" and v is not None)
