"""Several stages as one run: `config.stages` names them in order (e.g. teacher → kd → sft → eval), each
runs in `<workdir>/<name>/` with the base config updated by `config.stage_settings.<name>`.

Chaining: a training stage writes `<workdir>/<name>/params`; a later stage uses it through
`model_from` / `teacher_from` (the name of an earlier stage). Without `model_from`, a stage that has no
model source of its own starts from the previous training stage's params.

Resume: a finished stage leaves `<workdir>/<name>/stage_done.json` and is not run again; an unfinished
one resumes from its own checkpoints (training) or predictions (evaluation).
"""

from __future__ import annotations

import copy
import logging
import os
import time

import jax
from ml_collections import ConfigDict

from clinkd_jax import distributed, files, tracking
from clinkd_jax.eval import run as eval_run
from clinkd_jax.eval.during_training import EvalDuringTraining, format_point
from clinkd_jax.eval.report import comparison_table, headline_rows, headline_table, mean_value
from clinkd_jax.model_source import ModelSource, names_a_source
from clinkd_jax.models.config import ConfigError
from clinkd_jax.train import loop, rct

log = logging.getLogger("clinkd_jax.recipe")
CHAIN_KEYS = ("model_from", "teacher_from", "rct_from")


def _merge(base: ConfigDict, override: ConfigDict, where: str) -> None:
    for key, value in override.items():
        if key in CHAIN_KEYS:
            continue
        if key not in base:
            raise KeyError(f"{where}.{key} is not a config field")
        if key in ("text_overrides", "vision_overrides"):  # an open map: the stage's set replaces the base's
            with base.unlocked():
                base[key] = copy.deepcopy(value)
        elif isinstance(value, ConfigDict) and isinstance(base[key], ConfigDict):
            _merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def stage_configs(c, workdir: str) -> list[tuple[str, ConfigDict, str]]:
    """[(name, full config, stage workdir)] in order; raises ConfigError on a bad plan."""
    base = copy.deepcopy(c)
    with base.unlocked():
        base.stages = ()
    if base.data.format == "demo" and not base.data.demo_dir:
        base.data.demo_dir = os.path.join(workdir, "demo_data")  # generated once, shared by every stage
    if not base.data.sizes_cache:
        base.data.sizes_cache = os.path.join(workdir, "data_sizes.json")  # measured once for every stage
    out, trained, rct_done = [], [], []
    for name in c.stages:
        if name not in c.stage_settings:
            raise ConfigError(f"stages names {name!r} but stage_settings.{name} does not exist")
        settings = c.stage_settings[name]
        cfg = copy.deepcopy(base)
        try:
            _merge(cfg, settings, f"stage_settings.{name}")
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        for key, target in (("model_from", "model"), ("teacher_from", "teacher")):
            ref = settings.get(key, "")
            if ref:
                if ref not in trained:
                    raise ConfigError(f"stage_settings.{name}.{key}={ref!r} is not an earlier training stage")
                ModelSource(target, "orbax_dir", os.path.join(workdir, ref, "params")).put(cfg[target])
        ref = settings.get("rct_from", "")
        if ref:
            if ref not in rct_done:
                raise ConfigError(f"stage_settings.{name}.rct_from={ref!r} is not an earlier rct stage")
            cfg.data.extra_files = tuple(cfg.data.extra_files) + (os.path.join(workdir, ref, "corrected.jsonl"),)
        has_source = names_a_source(settings.get("model", {}))
        if not settings.get("model_from", "") and not has_source and trained:
            ModelSource("model", "orbax_dir", os.path.join(workdir, trained[-1], "params")).put(cfg.model)
        out.append((name, cfg, os.path.join(workdir, name)))
        if cfg.stage in ("sft", "kd"):
            trained.append(name)
        elif cfg.stage == "rct":
            rct_done.append(name)
    return out


def run_stage(cfg, stage_dir: str, name: str = "", group_dir: str = "", chain: dict | None = None) -> dict:
    """One stage (config.stage) in stage_dir, named `name` in the run in `group_dir` (by default the stage alone,
    named by its kind), chained to earlier stages as `chain` says; returns its summary."""
    with tracking.stage_run(cfg, stage_dir, name or cfg.stage, group_dir or stage_dir, chain) as tracked:
        if cfg.stage == "eval":
            return eval_run.run(cfg, stage_dir)
        if cfg.stage == "rct":
            summary = rct.run(cfg, stage_dir)
        else:
            hooks = rct.InRun.hooks(cfg, stage_dir) + EvalDuringTraining.hooks(cfg, stage_dir)
            summary = loop.run(cfg, stage_dir, hooks=hooks)
            summary.pop("state", None)
        tracked.summarize({f"final/{k}": v for k, v in summary.get("final", {}).items()})
        return summary


def describe(name: str, cfg, settings) -> str:
    """What a stage does, in words, for the console."""
    if cfg.stage == "eval":
        src = ModelSource.of(cfg, "model", required=False)
        random = src is not None and src.kind == "preset"
        model = settings.get("model_from", "") or ("a random model" if random else "the last trained model")
        return f"evaluates {model} on {', '.join(cfg.eval.tasks)} (BiRD/ClinKD protocol)"
    if cfg.stage == "rct":
        return "one Reflective Correction round: the model answers, the corrector rewrites the flagged answers"
    gaps = "MCG-RoPE gaps {}/{}".format(*cfg.data.mrope_gaps)
    steps = f"{cfg.train.steps} steps" if cfg.train.steps > 0 else f"{cfg.data.num_epochs} epoch(s)"
    if cfg.stage == "kd":
        what = (f"ClinKD distillation from {settings.get('teacher_from', '') or 'the teacher'} "
                f"(alpha {cfg.kd.alpha}, T {cfg.kd.temperature}{kd_clause(cfg)})")
    else:
        what = "supervised fine-tuning" + (" with Reflective Correction rounds" if cfg.rct.every_steps > 0 else "")
    return f"{what}, {steps}, {gaps}"


def kd_clause(cfg) -> str:
    """A distillation stage's divergence and answers sampled in the step, as a clause ("" for ClinKD's own)."""
    k = cfg.kd
    out = "" if k.divergence in ("forward_kl", "forward") else f", {k.divergence}"
    out += f" beta {k.jsd_beta}" if k.divergence == "jsd" else ""
    if k.on_policy_fraction > 0:
        out += f", on-policy on {100 * k.on_policy_fraction:g} % of the steps"
    return out + (", on the teacher's sampled answers" if k.seq_kd else "")


def trained_as(cfg) -> str:
    """How a training stage trained its model, in a few words (an ablation table's column)."""
    return f"KD{kd_clause(cfg)}" if cfg.stage == "kd" else "SFT"


def announce(line: str) -> None:
    """A stage line on the console (process 0), apart from the log's detail."""
    if jax.process_index() == 0:
        print(line, flush=True)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def run(c, workdir: str) -> dict:
    """Run every stage not yet done; returns {"stage": "recipe", "stages": [(name, summary), ...]}."""
    plan = stage_configs(c, workdir)
    for _, cfg, _ in plan:  # a missing wandb package is said before the first stage, not after it
        tracking.check(cfg)
    done, start, ran = [], time.perf_counter(), False
    for k, (name, cfg, stage_dir) in enumerate(plan, 1):
        marker = os.path.join(stage_dir, "stage_done.json")
        where = f"[{k}/{len(plan)}] {name}"
        brief = files.read_json(marker)  # a torn one is named and set aside: the stage runs (resumes) again
        if isinstance(brief, dict):
            announce(f"== {where}: already done ({marker}), skipped")
            done.append((name, brief))
            continue
        announce(f"== {where} starts: {describe(name, cfg, c.stage_settings[name])} -> {stage_dir}")
        began = time.perf_counter()
        distributed.set_stage(name)
        chain = {k: c.stage_settings[name][k] for k in CHAIN_KEYS if c.stage_settings[name].get(k, "")}
        summary, ran = run_stage(cfg, stage_dir, name, workdir, chain), True
        now = time.perf_counter()
        announce(f"== {where} {'interrupted' if summary.get('preempted') else 'done'} in {_minutes(now - began)} "
                 f"({_minutes(now - start)} since the start)")
        if summary.get("preempted"):
            log.warning("stage %s was interrupted; run the same command again to resume", name)
            return {"stage": "recipe", "stages": done + [(name, summary)], "workdir": workdir, "complete": False}
        brief = {k: v for k, v in summary.items()
                 if k in ("stage", "steps", "final", "means", "skipped", "rct", "eval_curve")}
        if jax.process_index() == 0:  # one writer per shared workdir
            files.write_json(marker, brief, default=float)
        done.append((name, brief))
    evals = eval_results([(name, d) for name, cfg, d in plan if cfg.stage == "eval"])
    if jax.process_index() == 0:
        files.write_text(os.path.join(workdir, "recipe_summary.md"),
                         summary_table(done) + ("\n" + comparison(evals) if evals else ""))
    if ran:  # the summary's own W&B run, in the stages' group
        with tracking.stage_run(c, workdir, "recipe", workdir, {"stages": list(c.stages)}, kind="recipe") as tracked:
            if tracked.enabled:
                tracked.log_result({"recipe/stages": tracking.Table(["stage", "kind", "result"], stage_rows(done)),
                                    "recipe/evaluations": evaluations_table(c, plan, evals)})
    return {"stage": "recipe", "stages": done, "workdir": workdir, "complete": True, "evals": evals}


def eval_results(stages) -> dict[str, dict]:
    """{stage name: {task: result}} from each evaluation stage's metrics.json (where one was written)."""
    out = {}
    for name, stage_dir in stages:
        path = os.path.join(stage_dir, "metrics.json")
        metrics = files.read_json(path)
        if isinstance(metrics, dict) and "tasks" in metrics:
            out[name] = metrics["tasks"]
    return out


def comparison(evals: dict[str, dict]) -> str:
    return ("The evaluations side by side (8-modality means, ×100):\n\n" + headline_table(evals)
            + "\nPer task and modality (each stage's results.md has every metric; a modality without items counts "
            "0 in the mean):\n\n" + comparison_table(evals))


def evaluations_table(c, plan, evals: dict[str, dict]) -> tracking.Table:
    """The evaluations side by side (an ablation's arms): a row per evaluation stage with the model it evaluated, how
    that model was trained, its MCG-RoPE gaps, and each task's headline metric (8-modality mean, ×100)."""
    columns, rows = headline_rows(evals)
    gaps, trained, last = {}, {}, ""
    for name, cfg, _ in plan:
        gaps[name] = "{}/{}".format(*cfg.data.mrope_gaps)
        if cfg.stage in ("sft", "kd"):
            trained[name] = last = trained_as(cfg)
        source = c.stage_settings[name].get("model_from", "")
        trained.setdefault(name, trained.get(source, "") if source else last)  # an evaluation: its model's
    described = [[c.stage_settings[name].get("model_from", "") or "the last trained model", trained[name], gaps[name]]
                 for name in evals]
    return tracking.Table(["evaluation", "model", "training", "MCG-RoPE gaps", *columns],
                          [[row[0], *d, *(None if v is None else 100 * v for v in row[1:])]
                           for row, d in zip(rows, described)])


def summary_table(stages) -> str:
    return "\n".join(["| stage | kind | result |", "|---|---|---|"]
                     + [f"| {name} | {kind} | {result} |" for name, kind, result in stage_rows(stages)]) + "\n"


def stage_rows(stages) -> list[list[str]]:
    """[stage name, kind, what it did or scored] per stage."""
    rows = []
    for name, s in stages:
        if s.get("stage") == "eval":
            parts = []
            for task, mean in s.get("means", {}).items():
                value = mean_value(task, mean)
                parts.append(f"{task} {100 * value:.2f}" if value is not None else f"{task} –")
            result = ", ".join(parts)
        elif s.get("stage") == "rct":
            f = s.get("final", {})
            result = f"{f.get('items', 0)} answered, {f.get('flagged', 0)} flagged, {f.get('corrected', 0)} corrected"
        else:
            final = s.get("final", {})
            result = f"{s.get('steps', 0)} steps, loss {float(final.get('loss', float('nan'))):.4f}"
            if s.get("rct"):  # rounds inside the run
                rounds = s["rct"]
                total = {k: sum(r[k] for r in rounds) for k in ("answered", "flagged", "corrected")}
                result += (f"; RCT {len(rounds)} round(s): {total['answered']} answered, {total['flagged']} flagged, "
                           f"{total['corrected']} corrected")
        if s.get("eval_curve"):  # evaluations during training
            result += "; evaluated at " + "; ".join(f"step {p['step']}: {format_point(p)}" for p in s["eval_curve"])
        rows.append([name, s.get("stage", "?"), result])
    return rows
