"""The evaluation section, declared with its defaults and what each field accepts (`clinkd_jax.settings`), and an
evaluation stage's checks: `check_settings` reads no file (`clinkd_jax.aot` checks with it), `check_files` checks
what the settings name on disk."""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated

from clinkd_jax import settings
from clinkd_jax.data.dataset import TASKS, eval_image_dir, task_of, test_files
from clinkd_jax.eval import sasg
from clinkd_jax.models.config import ConfigError
from clinkd_jax.settings import AtLeast


@dataclasses.dataclass(frozen=True)
class Eval:
    """Evaluation (stage "eval"): the BiRD/ClinKD protocol (clinkd-spec §3.5-3.7); the model is `model.*`."""

    data_dir: str = ""  # folder holding Test_VG.json, Test_RO.json, Test_GC.json, Test_MII.json
    tasks: tuple = TASKS  # which of them to run
    files: tuple = ()  # explicit test files instead (task read from the name: ..._VG_..., Test_RO.json, ...)
    image_dir: str = ""  # default: data.image_dir
    predictions: tuple = ()  # score-only: existing prediction JSONL files (any system); no model is loaded
    limit: Annotated[int, AtLeast(0)] = 0  # > 0: only the first N items of each file (a quick look)
    # > 0 on an sft/kd stage: evaluate the current params (eval.tasks, eval.limit) after every this many steps;
    # the curve goes to <workdir>/eval_curve.jsonl (clinkd_jax.eval.during_training)
    every_steps: Annotated[int, AtLeast(0)] = 0
    batch_size: Annotated[int, AtLeast(1)] = 8  # prompts per generate call (global)
    text_buckets: tuple = (256, 512, 1024, 2048)  # left-padded prompt lengths (one compile each)
    patch_buckets: tuple = (1600, 2704, 4096, 5376)  # per-prompt patch slots; 1024^2 px -> <= 5329 patches
    min_pixels: int = 512 * 512  # ClinKD evaluation budget; 0: the checkpoint's preprocessor_config.json's
    max_pixels: int = 1024 * 1024  # (else its family's published one); docs/models.md
    max_new_tokens: Annotated[int, AtLeast(1)] = 80  # BiRD/ClinKD
    max_new_tokens_mii: Annotated[int, AtLeast(1)] = 100  # whole-image description
    temperature: float = 0.0  # 0 = greedy (the protocol)
    top_p: float = 1.0
    # > 1: SASG at test time, N sampled candidates, keep the most agreed-upon (not the paper's protocol)
    sasg_samples: Annotated[int, AtLeast(0)] = 0
    sasg_temperature: float = 0.7  # our default; the paper gives none
    sasg_top_p: float = 0.9  # our default
    sasg_similarity: str = "overlap"  # overlap | rouge_l | box_iou | "module:function"
    spice: bool = True  # SPICE needs Java + Stanford CoreNLP 3.6.0 jars; reported as skipped when missing
    # images per modality in <workdir>/gallery/<task>.html (0 = none)
    gallery_per_modality: Annotated[int, AtLeast(0)] = 4
    threads: Annotated[int, AtLeast(1)] = 4  # image loading threads


def validate(c, workdir: str) -> None:
    check_settings(c)
    check_files(c, workdir)


def check_settings(c) -> None:
    """The evaluation stage's settings; reads no file."""
    e = c.eval
    for p in e.predictions:
        if task_of(p) is None:
            raise ConfigError(f"eval.predictions: cannot tell the task of {p} (name it like Test_VG.jsonl)")
    if e.predictions:
        return
    settings.check(c, {"eval": Eval})
    unknown = [t for t in e.tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks has {unknown}; known: {TASKS}")
    for path in e.files:
        if task_of(path) is None:
            raise ConfigError(f"eval.files: cannot tell the task of {path} (name it like Test_VG.json)")
    if e.sasg_samples > 1 and e.sasg_temperature <= 0:
        raise ConfigError("eval.sasg_samples > 1 needs eval.sasg_temperature > 0 (identical greedy candidates)")
    try:
        sasg.resolve(e.sasg_similarity)
    except (ValueError, ImportError, AttributeError) as err:
        raise ConfigError(f"eval.sasg_similarity: {err}") from None


def check_files(c, workdir: str) -> None:
    """The predictions to score, else the model's checkpoint, the test files and their images."""
    for p in c.eval.predictions:
        if not os.path.isfile(p):
            raise ConfigError(f"eval.predictions: {p} does not exist")
    if c.eval.predictions:
        return
    settings.check_files(c)
    for path in test_files(c, workdir).values():
        if not os.path.isfile(path):
            raise ConfigError(f"eval: test file {path} not found (eval.data_dir / eval.files / eval.tasks)")
    if not os.path.isdir(eval_image_dir(c, workdir)):
        raise ConfigError(f"eval.image_dir={eval_image_dir(c, workdir)!r} is not a directory")
