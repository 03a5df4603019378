"""The training run end to end: exact resume, restore onto another mesh, NaN stop, SIGTERM save,
config validation and the command line."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import reference as R
from ml_collections import ConfigDict

from clinkd_jax import checkpoint, sharding
from clinkd_jax.model_source import ModelSource, tokenizer_dir
from clinkd_jax.models import Qwen2VL
from clinkd_jax.models.qwen2vl import abstract_params
from clinkd_jax.stage import encoder_for
from clinkd_jax.train import loop
from clinkd_jax.train import state as state_lib
from clinkd_jax.train.config import ConfigError, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import demo_train  # noqa: E402

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}


def small_config(**changes):
    c = demo_train.get_config()
    c.model.text_overrides = SMALL
    c.data.batch_size = 2
    c.data.text_buckets = (192,)
    c.data.patch_buckets = (256,)
    c.data.max_pixels = 112 * 112
    c.checkpoint.save_every = 3
    c.checkpoint.async_save = False
    c.train.progress = False
    c.train.total_steps_hint = 20
    c.data.num_epochs = None
    return R.override(c, changes)


def losses_of(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's reads left in flight
def test_resume_is_exact(tmp_path, caplog):
    """6 steps straight == 3 steps, stop, resume, 3 more: same losses and bit-identical parameters; also after
    the latest step was damaged on disk (resumed from the one before)."""
    straight = loop.run(small_config(**{"train.steps": 6}), str(tmp_path / "a"))
    loop.run(small_config(**{"train.steps": 3}), str(tmp_path / "b"))
    resumed = loop.run(small_config(**{"train.steps": 6}), str(tmp_path / "b"))
    assert resumed["start_step"] == 3 and resumed["steps"] == 6
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.isfile(tmp_path / "a" / "loss.png") and os.listdir(tmp_path / "a" / "tensorboard")
    # the same command after the latest step's files were cut short on disk (committed, then damaged): the step is
    # named and skipped, the run resumes from step 3 and ends as the straight run did; with no readable step left,
    # one CheckpointError naming every step
    def cut(step):
        for root, _, names in os.walk(tmp_path / "b" / "checkpoints" / str(step) / "state"):
            for name in names:
                if "/d" in root.replace(os.sep, "/"):  # the array data files, not the metadata
                    os.truncate(os.path.join(root, name), 8)

    cut(6)
    with caplog.at_level("WARNING", logger="clinkd_jax.checkpoint"):
        again = loop.run(small_config(**{"train.steps": 6}), str(tmp_path / "b"))
    assert again["start_step"] == 3 and "checkpoint step 6" in caplog.text and "cannot be read" in caplog.text
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(again["state"].params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "b" / "checkpoints") if d.isdigit())
    assert 3 in steps and 6 in steps and "6.unreadable" in os.listdir(tmp_path / "b" / "checkpoints")
    for step in steps:
        cut(step)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint step can be read: step 6 .*; step 3 "):
        loop.run(small_config(**{"train.steps": 9}), str(tmp_path / "b"))


def test_restore_onto_another_mesh(tmp_path):
    c = small_config(**{"train.steps": 3})
    saved = loop.run(c, str(tmp_path / "r"))["state"]
    cfg = ModelSource.of(c, "model").geometry()
    model = Qwen2VL(cfg)
    tx = state_lib.optimizer(state_lib.OptimConfig(frozen=tuple(c.optim.frozen)))
    mesh = sharding.make_mesh((2, 2, 2))
    target = checkpoint.abstract_with_shardings(state_lib.abstract_state(abstract_params(model), tx),
                                                state_lib.state_shardings(abstract_params(model), tx, mesh))
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path / "r" / "checkpoints"))
    step, restored, data_state = ckpt.restore(target)
    ckpt.close()
    assert step == 3 and (data_state["epoch"], data_state["batch"]) == (0, 3)  # one state for all hosts
    up = restored.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.mesh.shape == mesh.shape
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_loss_stops_with_the_step(tmp_path):
    c = small_config(**{"train.steps": 8, "optim.learning_rate": 1e30, "optim.warmup_steps": 0, "optim.grad_clip": 0.0})
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss .* at step \d+; the last good checkpoint is step"):
        loop.run(c, str(tmp_path / "nan"))


@pytest.mark.parametrize("changes, message", [
    ({"stage": "distil"}, "stage='distil' is not one of"),
    ({"model.preset": "huge"}, "model.preset='huge' is not one of"),
    ({"model.hf_dir": "/nonexistent"}, "give exactly one of hf_dir / orbax_dir / preset"),
    ({"stage": "kd"}, "teacher: no source"),
    ({"data.patch_buckets": (130,)}, "must be multiples of 4"),
    ({"data.text_buckets": (512, 256)}, "must be increasing"),
    ({"mesh.shape": (3, 3, 1)}, r"mesh.shape=\(3, 3, 1\) does not fit the 8 available devices"),
    ({"model.attention": "flash"}, "model.attention='flash' is not one of"),
    ({"runtime.vision_query_block": -1}, r"runtime.vision_query_block=-1 must be 0 \(all rows\)"),
    ({"runtime.attention_loop": "heads"}, "runtime.attention_loop='heads' is not one of"),
    ({"runtime.decode_layers": "loop"}, "runtime.decode_layers='loop' is not one of"),
    ({"runtime.scan_unroll": 0}, r"runtime.scan_unroll=0 must be >= 1"),
    # the fields' old place (model.*) is still read, and named where it is set
    ({"model.attention_loop": "heads"}, "model.attention_loop='heads' is not one of"),
    ({"model.scan_unroll": 2, "runtime.scan_unroll": 4}, "model.scan_unroll=2 and runtime.scan_unroll=4 disagree"),
    ({"model.scan_unroll": 2, "runtime.scan_unroll": 2}, None),
    ({"train.loss_backward": "remat"}, "train.loss_backward='remat' is not one of"),
    ({"data.format": "csv"}, "data.format='csv'"),
    ({"data.demo_layout": "diagonal"}, "data.demo_layout='diagonal' is not one of"),
    ({"data.format": "demo", "data.demo_layout": "grid", "data.train_files": ("",), "data.image_dir": ""}, None),
    ({"data.format": "medgrit", "data.demo_layout": "grid"}, "data.demo_layout='grid' has no effect"),
    ({"model.vision_overrides": {"depht": 4}}, r"model.vision_overrides: \['depht'\] are not VisionConfig fields"),
    ({"model.preset": "", "model.orbax_dir": "/tmp", "model.text_overrides": {"hidden_size": 8}},
     "model.text_overrides apply to a preset only"),
])
def test_config_errors_name_the_field(changes, message):
    c = small_config()
    for key, value in changes.items():
        if "." in key:
            section, field = key.split(".")
            c[section][field] = ConfigDict(value) if isinstance(value, dict) else value
        else:
            c[key] = value
    if message is None:  # a setting that is valid as given
        validate(c)
        return
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_runtime_settings_in_their_old_place_are_read_with_a_warning(caplog):
    """runtime.* used to be model.*: a value set there still reaches the module (and is said once) while runtime.*
    keeps its default; runtime.* wins where only it is set."""
    from clinkd_jax import settings

    cfg = ModelSource.of(small_config(), "model").geometry()
    c = small_config(**{"model.scan_unroll": 2, "model.decode_layers": "scan"})
    settings._WARNED.clear()
    with caplog.at_level("WARNING", logger="clinkd_jax.setup"):
        validate(c)
        validate(c)
    said = [r.getMessage() for r in caplog.records if "is now runtime." in r.getMessage()]
    assert len(said) == 2 and "model.scan_unroll is now runtime.scan_unroll; 2 is used" in said[0], said
    model = settings.model_module(c, cfg)
    assert (model.scan_unroll, model.decode_layers, model.attention_loop) == (2, "scan", "auto")
    model = settings.model_module(small_config(**{"runtime.scan_unroll": 3}), cfg)
    assert model.scan_unroll == 3 and model.decode_layers == "auto"


def test_kd_switch_errors_name_the_field():
    c = small_config(**{"teacher.preset": "tiny_qwen"})
    c.stage = "kd"
    c.kd.mask = "shifted"
    with pytest.raises(ConfigError, match="kd.mask='shifted'"):
        validate(c)


def _cli(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-m", "clinkd_jax.main", "--config=configs/demo_train.py", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_saves_and_stops(tmp_path):
    """A preemptible VM's SIGTERM: the run saves the step it is at and exits cleanly."""
    workdir = tmp_path / "pre"
    overrides = [f"--workdir={workdir}", "--config.train.steps=200", "--config.checkpoint.save_every=1000",
                 "--config.train.progress=False", "--config.data.batch_size=2", "--config.data.text_buckets=(192,)",
                 "--config.data.max_pixels=12544", "--config.data.patch_buckets=(256,)"]
    p = _cli(overrides)
    deadline = time.time() + 240
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
        time.sleep(1)
    assert (workdir / "metrics.jsonl").exists(), "training never started"
    time.sleep(2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["preempted"] and 0 < summary["steps"] < 200
    assert os.path.isdir(workdir / "checkpoints" / str(summary["steps"]))


def test_kd_stage_runs_from_a_saved_teacher(tmp_path):
    """Stage kd through the loop: the teacher is an earlier run's params checkpoint (which carries the
    tokenizer and chat template it was trained with), on its own M-RoPE positions; both loss terms are logged."""
    loop.run(small_config(**{"train.steps": 2}), str(tmp_path / "t"))
    assets = tmp_path / "t" / "params" / checkpoint.ASSETS_DIR
    assert (assets / "tokenizer.json").is_file()
    from clinkd_jax.data.text import QWEN2VL_TEMPLATE

    assert (assets / "chat_template.jinja").read_text() == QWEN2VL_TEMPLATE  # the template the run used
    c = small_config(**{"train.steps": 2, "teacher.orbax_dir": str(tmp_path / "t" / "params"),
                        "teacher.positions": "own", "teacher.dtype": "float32"})
    c.stage = "kd"
    out = loop.run(c, str(tmp_path / "kd"))
    rows = [json.loads(line) for line in open(tmp_path / "kd" / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["loss_kd"] > 0 and r["loss_ce"] > 0 for r in rows)
    np.testing.assert_allclose(rows[0]["loss"], (0.5 * rows[0]["loss_kd"] + rows[0]["loss_ce"]) / 1.5, rtol=1e-5)
    assert out["final"]["loss_kd"] == rows[-1]["loss_kd"]


def test_a_chained_stage_uses_the_checkpoint_tokenizer(tmp_path):
    """A model read from a params checkpoint is tokenized with the files saved beside it, never with
    another tokenizer; a checkpoint without them is refused, naming the field."""
    loop.run(small_config(**{"train.steps": 1}), str(tmp_path / "a"))
    params = tmp_path / "a" / "params"
    c = small_config()
    c.model.preset, c.model.text_overrides, c.model.orbax_dir = "", {}, str(params)
    assert tokenizer_dir(c) == str(params / checkpoint.ASSETS_DIR)
    enc = encoder_for(c)
    assert enc.template == encoder_for(small_config()).template
    import shutil

    shutil.rmtree(params / checkpoint.ASSETS_DIR)
    with pytest.raises(ConfigError, match="holds no tokenizer .* set data.tokenizer"):
        tokenizer_dir(c)
