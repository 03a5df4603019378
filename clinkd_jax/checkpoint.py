"""Orbax checkpoints of model parameters (the converter's format; the trainer adds its state beside it).

Layout of a params checkpoint directory:
    params/            Orbax PyTree checkpoint of the parameter tree
    model_config.json  the Qwen2-VL config in Hugging Face (published) form
    hf_assets/         tokenizer, chat template and processor files carried along from the source
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from clinkd_jax import distributed, files
from clinkd_jax import sharding as sharding_lib
from clinkd_jax.data import processor
from clinkd_jax.hf_checkpoint import CheckpointError, copy_assets, write_side_files
from clinkd_jax.models.config import Qwen2VLConfig
from clinkd_jax.models.qwen2vl import Qwen2VL, param_shardings

log = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
ASSETS_DIR = "hf_assets"
ANSWER_SETTINGS = "answer_settings.json"


def save_params(path: str, params, cfg: Qwen2VLConfig, *, assets_from: str | None = None,
                chat_template: str | None = None, side_files: dict | None = None) -> None:
    """Params + model_config.json; with `assets_from`, the tokenizer files it holds go to hf_assets/ and
    `chat_template` (the template the run used) to hf_assets/chat_template.jinja, so a later stage, and an
    export, use exactly the tokenizer and template this model was trained with. `side_files`: {name: JSON value}
    written beside the params (e.g. answer_settings_file(c)). model_config.json is written last: a directory
    without it is no model, so a save cut short is never read as one missing its processor or answer settings."""
    path = os.path.abspath(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(path, "params"), params, force=True)
            ckptr.wait_until_finished()
    except Exception as e:  # Orbax's temporary folder is removed by the next save
        if files.is_disk_full(e):
            raise files.disk_full(os.path.join(path, "params"), sum(x.nbytes for x in jax.tree.leaves(params))) from e
        raise
    if jax.process_index() == 0:
        if assets_from:
            copy_assets(assets_from, os.path.join(path, ASSETS_DIR), chat_template)
        processor.write(os.path.join(path, ASSETS_DIR), cfg)
        write_side_files(path, side_files)
        files.write_json(os.path.join(path, CONFIG_FILE), cfg.to_hf_dict())


# what decides how a trained model is asked a question (saved beside its params as ANSWER_SETTINGS)
ANSWER_FIELDS = {"data": ("chat_template", "box_markup", "mrope_gaps"),
                 "eval": ("min_pixels", "max_pixels", "text_buckets", "patch_buckets", "max_new_tokens",
                          "max_new_tokens_mii", "temperature", "top_p"),
                 "model": ("dtype",)}


def answer_settings(c) -> dict:
    return {part: {k: c[part][k] for k in keys} for part, keys in ANSWER_FIELDS.items()}


def answer_settings_file(c) -> dict:
    """The side file (for save_params / save_hf_checkpoint) that says how the saved model is asked under run config
    `c` (prompt template, MCG-RoPE gaps, box markup, image budget, decoding: ANSWER_FIELDS), so
    `clinkd_jax.predict` and `serve` ask it as its own run evaluated it."""
    return {ANSWER_SETTINGS: answer_settings(c)}


def load_config(path: str) -> Qwen2VLConfig:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a clinkd_jax params checkpoint")
    with open(file) as f:
        cfg = Qwen2VLConfig.from_hf_dict(json.load(f), source=file)
    return processor.read(os.path.join(path, ASSETS_DIR), cfg)


def load_params(path: str, *, mesh=None, rules=None, dtype=None):
    """(config, params) restored directly onto their shards for `mesh` (any mesh shape)."""
    path = os.path.abspath(path)
    cfg = load_config(path)
    mesh = mesh or sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    shardings = param_shardings(Qwen2VL(cfg), mesh, rules)
    where = os.path.join(path, "params")
    if not os.path.isdir(where):
        raise CheckpointError(f"{path}: no params/ directory; not a clinkd_jax params checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        # Orbax's own failures on a torn or foreign directory are deep and long: said here with the path
        try:
            stored = _plain(getattr(m := ckptr.metadata(where), "item_metadata", m))
        except Exception as e:
            raise CheckpointError(f"{where}: unreadable checkpoint metadata ({_first_line(e)}); the directory is "
                                  "incomplete or corrupt: write it again") from e
        if not jax.tree.leaves(stored):
            raise CheckpointError(f"{where}: no parameter metadata (_METADATA); the directory is incomplete: write "
                                  "it again")
        if jax.tree.structure(stored) != jax.tree.structure(shardings):
            raise CheckpointError(f"{where} holds other parameters than {CONFIG_FILE} describes (e.g. "
                                  f"{sorted(_paths(stored) ^ _paths(shardings))[:3]})")
        target = jax.tree.map(
            lambda meta, s: jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(dtype or meta.dtype), sharding=s),
            stored, shardings,
        )
        try:
            params = ckptr.restore(where, target)
        except Exception as e:
            raise CheckpointError(f"{where}: parameters cannot be read ({_first_line(e)}); the checkpoint is "
                                  "incomplete or corrupt: write it again") from e
    return cfg, params


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause (TensorStore's, which names the file and the bytes)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _paths(tree) -> set[str]:
    return {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree)}


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
                cleanup_tmp_directories=True,  # a save cut short (killed, disk full) is removed on the next start
            ),
        )
        self._saving: tuple[int, int] | None = None  # (step, bytes) of the save in flight
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        need = sum(x.nbytes for x in jax.tree.leaves(state))
        with self._disk_errors(step, need):  # an asynchronous save's failure surfaces at the next save or at close
            saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._saving = (step, need)
        return saved

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None = None, need: int = 0):
        """A save that ran out of disk space, said in one line: which step, where, the space a step takes and
        what is free; the last complete step is untouched (Orbax writes a temporary directory first)."""
        try:
            yield
        except Exception as e:
            if not files.is_disk_full(e):
                raise
            self._failed = True
            step, need = self._saving or (step, need)
            where = re.search(r"/(\d+)\.orbax-checkpoint-tmp", _chain_text(e))  # the step the disk ran out on
            step = int(where.group(1)) if where else step
            free = shutil.disk_usage(self.directory).free
            done = [s for s in self.manager.all_steps() if s != step]
            need = _bytes_under(os.path.join(self.directory, str(max(done)))) if done else need  # on disk, if known
            raise files.DiskFull(f"checkpoint step {step} could not be written to {self.directory}: no space left on "
                           f"device (a step takes about {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free); "
                           + (f"step {max(done)} is complete: free space and run the same command to resume"
                              if done else "no complete step yet: free space and run the same command")) from e

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data_state) of the latest (or given) checkpoint, or None when there is none.

        A latest step that cannot be read (a file cut short or lost after Orbax committed it: a disk or copy
        fault) is named in the log and the previous step is tried; a run never starts from part of a step.
        Steps Orbax did not commit (killed mid-save) are not listed at all."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        failed = []
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore()))
            except Exception as e:  # Orbax / TensorStore raise many types for a damaged step
                failed.append(f"step {s} ({_first_line(e)})")
                log.warning("checkpoint step %d in %s cannot be read (%s)%s", s, self.directory, _first_line(e),
                            "; trying the one before" if s != steps[-1] else "")
                continue
            if failed:  # moved aside (kept for a look), so that the run can write those steps again
                if jax.process_index() == 0:
                    kept = [os.path.basename(files.set_aside(os.path.join(self.directory, str(bad))))
                            for bad in steps[: len(failed)]]
                    log.warning("resuming from step %d; the unreadable steps are kept as %s", s, ", ".join(kept))
                distributed.barrier("unreadable checkpoint steps moved aside")
                self.manager.reload()
            return s, out.state, out.data
        if failed:
            raise CheckpointError(f"{self.directory}: no checkpoint step can be read: {'; '.join(failed)}; delete "
                                  f"the damaged step directories (or the whole directory to start afresh)")
        return None

    def wait(self):
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self):
        try:
            self.wait()
        finally:
            if not self._failed:  # after a failed save Orbax's close raises the same error again
                self.manager.close()


def _chain_text(e: BaseException | None) -> str:
    parts = []
    while e is not None and len(parts) < 20:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _bytes_under(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what `TrainCheckpointer.restore` fills in."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
