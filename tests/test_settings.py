"""The run config's sections, declared once with their defaults and what each field accepts (clinkd_jax.settings,
train.config, eval.config): configs/base.py is built from them, and each stage checks every field it declares."""

import dataclasses
import re

import pytest

from clinkd_jax import settings
from clinkd_jax.eval import config as eval_config
from clinkd_jax.models.config import ConfigError
from clinkd_jax.train import config as train_config
from configs import base

SHARED, TRAINING, EVAL = settings.SECTIONS, train_config.SECTIONS, {"eval": eval_config.Eval}
STAGES = {  # a stage's check that reads no file, and the sections it must check
    "sft": (train_config.check_settings, {**SHARED, **TRAINING}),
    "eval": (eval_config.check_settings, {**SHARED, **EVAL}),
}


def config(stage: str):
    c = base.get_config()
    c.stage, c.model.preset = stage, "tiny"
    return c


def bad_values():
    """(section, field, a value it refuses, what the refusal says) for every field that declares what it accepts."""
    for name, section in {**SHARED, **TRAINING, **EVAL}.items():
        for key, checks in settings.field_checks(section).items():
            if not checks:
                continue
            default = dataclasses.asdict(section())[key]
            bad = "no-such-value" if isinstance(default, str) else -(10**6)
            yield name, key, bad, re.escape(f"{name}.{key}={bad!r}")


def test_the_base_config_is_the_sections_defaults():
    c = base.get_config()
    sections = {**SHARED, **TRAINING, **EVAL}
    assert set(c.keys()) == set(sections) | {"stage", "seed", "stages", "stage_settings"}
    for name, section in sections.items():
        assert c[name].to_dict() == dataclasses.asdict(section()), name


def test_a_declaration_lists_what_a_field_accepts():
    checks = settings.field_checks(settings.Data)
    assert checks["format"] and checks["batch_size"] and not checks["train_files"]
    for value in ("medgrit", "sharegpt", "demo"):
        for check in checks["format"]:
            check("data.format", value)  # accepted
    with pytest.raises(ConfigError, match=r"data.format='csv' is not one of \('medgrit', 'sharegpt', 'demo'\)"):
        checks["format"][0]("data.format", "csv")
    with pytest.raises(ConfigError, match="data.batch_size=0 must be > 0"):
        checks["batch_size"][0]("data.batch_size", 0)
    dtype = settings.field_checks(train_config.Optim)["mu_dtype"][0]
    dtype("optim.mu_dtype", "")  # "" = the parameters' dtype
    dtype("optim.mu_dtype", "bfloat16")
    with pytest.raises(ConfigError, match="optim.mu_dtype='bf17' is not a dtype"):
        dtype("optim.mu_dtype", "bf17")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_checks_every_field_it_declares(stage):
    """A value a section's declaration refuses stops the stage's check, naming the field: no section is declared
    and then left unchecked."""
    check, sections = STAGES[stage]
    check(config(stage))  # the defaults pass
    tried = 0
    for name, key, bad, says in bad_values():
        if name not in sections:
            continue
        c = config(stage)
        c[name][key] = bad
        with pytest.raises(ConfigError, match=says):
            check(c)
        tried += 1
    assert tried >= (25 if stage == "sft" else 24), tried  # as declared today; fewer = a declaration lost
