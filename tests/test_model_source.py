"""Where a model comes from, as one value (clinkd_jax.model_source.ModelSource): read from a config section, found
from a folder a user names, written back into a config section; nothing else in the package chooses a source."""

import json
import os
import subprocess
import sys

import flax
import jax
import pytest
from ml_collections import ConfigDict

from clinkd_jax import checkpoint
from clinkd_jax.model_source import KINDS, ModelSource
from clinkd_jax.models.config import ConfigError
from configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section(**fields) -> ConfigDict:
    c = base.get_config()
    for k, v in fields.items():
        c.model[k] = ConfigDict(v) if isinstance(v, dict) else v
    return c


def test_a_config_section_names_one_source():
    src = ModelSource.of(section(preset="tiny", family="qwen3_vl", text_overrides={"hidden_size": 64}), "model")
    assert (src.kind, src.where, src.family) == ("preset", "tiny", "qwen3_vl")
    assert src.text_overrides == (("hidden_size", 64),) and src.vision_overrides == ()
    assert src.describe() == "preset tiny" and src.checkpoint == "" and src.tokenizer_file() is None
    assert ModelSource.of(section(), "teacher", required=False) is None
    for fields, says in (({"preset": "tiny", "hf_dir": "/x"}, "give exactly one of hf_dir / orbax_dir / preset"),
                         ({}, "model: no source; set model.hf_dir"),
                         ({"preset": "huge"}, "model.preset='huge' is not one of"),
                         ({"preset": "tiny", "family": "qwen9"}, "model.family='qwen9' is not one of"),
                         ({"orbax_dir": "/x", "vision_overrides": {"depth": 2}},
                          "model.vision_overrides apply to a preset only, not to model.orbax_dir"),
                         ({"preset": "tiny", "text_overrides": {"hiden_size": 2}},
                          r"model.text_overrides: \['hiden_size'\] are not TextConfig fields")):
        with pytest.raises(ConfigError, match=says):
            ModelSource.of(section(**fields), "model")
    with pytest.raises(ConfigError, match="model.hf_dir='/nowhere' is not a directory"):
        ModelSource.of(section(hf_dir="/nowhere"), "model").check_files()  # settings first; the disk apart


def test_put_writes_the_source_and_nothing_else_of_one(tmp_path):
    """A chained stage's model is an earlier stage's params: the section names them alone (a preset's overrides
    would not apply to a checkpoint), and reads back as the same source; a checkpoint's family setting is kept (a
    check that it is what is expected)."""
    c = section(preset="tiny", family="qwen2_5_vl", text_overrides={"hidden_size": 64})
    params = ModelSource("model", "orbax_dir", str(tmp_path / "params"))
    params.put(c.model)
    assert [k for k in KINDS if c.model[k]] == ["orbax_dir"] and not c.model.text_overrides
    assert c.model.family == "qwen2_5_vl"
    assert ModelSource.of(c, "model") == ModelSource("model", "orbax_dir", str(tmp_path / "params"), "qwen2_5_vl")
    preset = ModelSource.of(section(preset="tiny", vision_overrides={"depth": 2}), "model")
    preset.put(c.model)
    assert ModelSource.of(c, "model") == preset


def test_find_a_checkpoint_in_what_a_user_names(tmp_path):
    """predict / serve --model: a params directory, a Hugging Face one, or a run's stage folder (its params/ first,
    else its export_hf/); anything else is refused naming the flag."""
    stage = tmp_path / "sft"
    (stage / "export_hf").mkdir(parents=True)
    (stage / "export_hf" / "config.json").write_text("{}")
    assert ModelSource.find(str(stage)) == ModelSource("model", "hf_dir", str(stage / "export_hf"))
    (stage / "params").mkdir()
    (stage / "params" / checkpoint.CONFIG_FILE).write_text("{}")
    found = ModelSource.find(str(stage))
    assert found == ModelSource("model", "orbax_dir", str(stage / "params"))
    assert found.assets == str(stage / "params" / checkpoint.ASSETS_DIR)
    with pytest.raises(checkpoint.CheckpointError, match="--model=.*: no such directory"):
        ModelSource.find(str(tmp_path / "none"))
    with pytest.raises(checkpoint.CheckpointError, match="neither a Hugging Face model directory"):
        ModelSource.find(str(tmp_path))


def test_nothing_else_chooses_a_source():
    """The fields that name a source are read in model_source.py alone (and written by the commands that point a
    config at a checkpoint through ModelSource.put): no other module of the package tests hf_dir / orbax_dir /
    preset to decide where a model comes from."""
    found = subprocess.run(["grep", "-rnE", r"\.(model|teacher)\.(hf_dir|orbax_dir|preset)\b|in (SOURCES|KINDS)\)",
                            "clinkd_jax", "--include=*.py"], cwd=ROOT, capture_output=True, text=True).stdout
    outside = [line for line in found.splitlines() if not line.startswith("clinkd_jax/model_source.py")]
    assert not outside, "\n".join(outside)
    assert sys.modules.get("clinkd_jax.run_setup") is None


@pytest.mark.parametrize("writer", ["params", "export_hf"])
def test_a_save_cut_short_is_no_model(tmp_path, monkeypatch, writer):
    """The file that makes a folder a model (model_config.json / config.json) is written after the processor file
    and the answer settings: a full disk at the answer settings leaves a folder `--model` refuses, not a model that
    would be asked with the defaults; the same save again completes it."""
    from clinkd_jax import files, hf_checkpoint
    from clinkd_jax.models import presets
    from clinkd_jax.models.qwen2vl import Qwen2VL, dummy_inputs

    cfg = presets.PRESETS["tiny_qwen"]()
    params = flax.linen.unbox(Qwen2VL(cfg).init(jax.random.key(0), **dummy_inputs(cfg))["params"])
    side = checkpoint.answer_settings_file(base.get_config())
    where = str(tmp_path / writer)
    save = {"params": lambda: checkpoint.save_params(where, params, cfg, side_files=side),
            "export_hf": lambda: hf_checkpoint.save_hf_checkpoint(params, cfg, where, side_files=side)}[writer]
    real = files.write_text

    def full_at_answers(path, text):
        if path.endswith(checkpoint.ANSWER_SETTINGS):
            raise files.disk_full(path)
        return real(path, text)

    monkeypatch.setattr(files, "write_text", full_at_answers)
    with pytest.raises(files.DiskFull):
        save()
    assert not {checkpoint.CONFIG_FILE, "config.json"} & set(os.listdir(where))
    with pytest.raises(checkpoint.CheckpointError, match="neither a Hugging Face model directory"):
        ModelSource.find(where)
    monkeypatch.setattr(files, "write_text", real)
    save()
    assert ModelSource.find(where).where == where
    saved = json.load(open(os.path.join(where, checkpoint.ANSWER_SETTINGS)))
    assert saved == json.loads(json.dumps(side[checkpoint.ANSWER_SETTINGS]))  # (tuples come back as lists)
