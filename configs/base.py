"""Every knob of a clinkd_jax training run. Experiment configs import this and override fields;
the command line overrides any field: --config.optim.learning_rate=1e-5 --config.kd.mask=aligned

Each section is declared in the package with its defaults, what each field does and what it accepts (allowed
values, bounds), next to the checks that read it:
  model, teacher, data, runtime, mesh    clinkd_jax/settings.py
  optim, train, kd, checkpoint, rct      clinkd_jax/train/config.py
  eval                                   clinkd_jax/eval/config.py
"""

from ml_collections import ConfigDict

from clinkd_jax import settings
from clinkd_jax.eval import config as eval_config
from clinkd_jax.train import config as train_config


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.stage = "sft"  # sft (cross-entropy) | kd (ClinKD distillation from `teacher`) | rct (one correction round) | eval
    c.seed = 0
    # --- several stages in one run (clinkd_jax.recipe): names run in order, each in <workdir>/<name>/ with
    # this config updated by stage_settings.<name> (+ model_from / teacher_from: an earlier stage's params)
    c.stages = ()  # e.g. ("teacher", "kd", "sft", "eval"); () = one run of `stage`
    c.stage_settings = ConfigDict()
    for name, section in {**settings.SECTIONS, **train_config.SECTIONS, "eval": eval_config.Eval}.items():
        c[name] = settings.defaults(section)
    return c
