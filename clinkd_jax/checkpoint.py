"""Orbax checkpoints of model parameters (the converter's format; the trainer adds its state beside it).

Layout of a params checkpoint directory:
    params/            Orbax PyTree checkpoint of the parameter tree
    model_config.json  the Qwen2-VL config in Hugging Face (published) form
    hf_assets/         tokenizer, chat template and processor files carried along from the source
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from clinkd_jax import sharding as sharding_lib
from clinkd_jax.convert.hf import copy_assets
from clinkd_jax.models.config import Qwen2VLConfig
from clinkd_jax.models.qwen2vl import Qwen2VL, param_shardings

CONFIG_FILE = "model_config.json"
ASSETS_DIR = "hf_assets"


def save_params(path: str, params, cfg: Qwen2VLConfig, *, assets_from: str | None = None,
                chat_template: str | None = None) -> None:
    """Params + model_config.json; with `assets_from`, the tokenizer files it holds go to hf_assets/ and
    `chat_template` (the template the run used) to hf_assets/chat_template.jinja, so a later stage, and an
    export, use exactly the tokenizer and template this model was trained with."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(cfg.to_hf_dict(), f, indent=2)
        if assets_from:
            copy_assets(assets_from, os.path.join(path, ASSETS_DIR), chat_template)


def load_config(path: str) -> Qwen2VLConfig:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a clinkd_jax params checkpoint")
    with open(file) as f:
        return Qwen2VLConfig.from_hf_dict(json.load(f), source=file)


def load_params(path: str, *, mesh=None, rules=None, dtype=None):
    """(config, params) restored directly onto their shards for `mesh` (any mesh shape)."""
    path = os.path.abspath(path)
    cfg = load_config(path)
    mesh = mesh or sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    shardings = param_shardings(Qwen2VL(cfg), mesh, rules)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(os.path.join(path, "params"))
        stored = getattr(stored, "item_metadata", stored)
        target = jax.tree.map(
            lambda meta, s: jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(dtype or meta.dtype), sharding=s),
            _plain(stored), shardings,
        )
        params = ckptr.restore(os.path.join(path, "params"), target)
    return cfg, params


def _plain(tree):
    """Orbax metadata trees may be custom mappings; make them plain dicts so tree.map lines up."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------------- training checkpoints
class TrainCheckpointer:
    """Orbax CheckpointManager for training: train state + data-iterator state + run config, saved
    asynchronously every `save_every` steps, the last `keep` kept. `restore` puts the state directly
    onto the shardings of the abstract target, so a run can resume on another mesh shape."""

    def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3, async_save: bool = True,
                 commit_files: bool = False):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
                # commit_files: a step is final once it holds commit_success.txt (what Orbax does on gs://),
                # instead of renaming a temporary directory: on a gcsfuse mount a rename is a full copy
                temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath if commit_files else None,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data_state) of the latest (or given) checkpoint, or None when there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(),
        ))
        return step, out.state, out.data

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what `TrainCheckpointer.restore` fills in."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
