"""Offline pseudo-labels: the teacher's top-k log-probabilities per distilled token, computed once and
kept in a store (clinkd_jax.data.pseudo_labels), for when teacher and student do not fit on the devices
together.

Write (one pass of the teacher over the training records; every host writes its own shard):
    python -m clinkd_jax.train.pseudo_labels --config=configs/x.py --workdir=DIR [--config.kd.top_k=64]
Train from it: `--config.stage=kd --config.kd.pseudo_labels=DIR/pseudo_labels`.

The loss then sums p (log p - log q) over the k stored tokens only (no renormalisation), which is the
online KL exactly when k covers the vocabulary and a lower bound otherwise. So a store is made for one
`kd.mask` and one temperature (both recorded in its meta.json and checked by the training run), the
forward KL only, and the student's position ids (`teacher.positions=shared`).
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from clinkd_jax import cli, distributed, files, sharding
from clinkd_jax.data import dataset, pipeline, records
from clinkd_jax.data import pseudo_labels as store
from clinkd_jax.models import quant
from clinkd_jax.models.qwen2vl import param_shardings
from clinkd_jax.stage import StageContext
from clinkd_jax.train import steps
from clinkd_jax.train.config import kd_config, pseudo_label_switches

IGNORE = -100


def kd_positions(labels_bl: np.ndarray, mask: str) -> np.ndarray:
    """(B, L) bool: positions whose prediction is distilled ("released": unshifted labels; "aligned")."""
    if mask == "released":
        return labels_bl != IGNORE
    nxt = np.concatenate([labels_bl[:, 1:], np.full((labels_bl.shape[0], 1), IGNORE)], axis=1)
    return nxt != IGNORE


def teacher_topk_fn(teacher, *, top_k: int, temperature: float, vocab: int, chunk: int = 256):
    """jit-able (params, batch) -> (ids (B, L, k) int32, logp (B, L, k) float32), chunked over positions."""

    def fn(params, batch):
        hidden, head = steps.hidden_and_head(teacher, params, batch)
        b, length, d = hidden.shape
        pad = (-length) % chunk
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)

        def one(hc):
            logp = jax.nn.log_softmax(head(hc).astype(jnp.float32)[..., :vocab] / temperature, axis=-1)
            vals, ids = jax.lax.top_k(logp, top_k)
            return ids.astype(jnp.int32), vals

        ids, vals = jax.lax.map(one, h)
        unchunk = lambda x: x.swapaxes(0, 1).reshape(b, -1, top_k)[:, :length]
        return unchunk(ids), unchunk(vals)

    return fn


def write(path: str, batches, topk_fn, params, *, mask: str, meta: dict, place=lambda b: b, to_host=np.asarray) -> int:
    """Run the teacher over `batches` (this host's rows of one epoch) into this host's shard of the store
    at `path`; process 0 then writes the index and meta.json. Returns the entries written by all hosts.
    `place` turns a host batch into the step's inputs, `to_host` an output back into this host's rows."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(path, exist_ok=True)
    if jax.process_index() == 0 and os.path.isfile(os.path.join(path, store.META)):
        os.remove(os.path.join(path, store.META))  # rewriting: the store is incomplete until meta.json is back
    distributed.barrier("pseudo-label store opened")
    shard = os.path.join(path, store.shard_name(jax.process_index(), jax.process_count()))
    writer = ArrayRecordWriter(shard, "group_size:1")
    order, closed = [], False
    try:
        for batch in batches:
            ids, logp = topk_fn(params, place(batch))
            ids, logp = to_host(ids), to_host(logp)
            where = kd_positions(batch["labels"], mask) & batch["attention_mask"].astype(bool)
            for i in np.flatnonzero(batch["sample_mask"]):
                pos = np.flatnonzero(where[i])
                writer.write(store.encode_entry(batch["record_index"][i], pos, ids[i, pos], logp[i, pos]))
                order.append(int(batch["record_index"][i]))
        closed = True
        writer.close()
    except Exception as e:  # ArrayRecord says a full disk in its message
        if not closed:
            with contextlib.suppress(Exception):
                writer.close()
        if files.is_disk_full(e):
            raise files.disk_full(shard) from e
        raise
    per_shard = distributed.allgather_json(order, "pseudo-label entries per shard")
    if jax.process_index() == 0:
        store.write_index(path, per_shard, {**meta, "mask": mask})
    return sum(len(o) for o in per_shard)


def main(argv):
    """Write `<workdir>/pseudo_labels` with the config's teacher over its training data (every host)."""
    del argv
    from absl import flags

    distributed.initialize_from_flags()
    c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    distributed.set_stage("pseudo-labels")
    pseudo_label_switches(c)  # a ConfigError ends the command in one line (clinkd_jax.cli)
    with distributed.fail_fast():
        write_store(c, workdir)


def write_store(c, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    stage = StageContext.of(c, workdir)
    mesh, rules = stage.mesh, stage.rules
    s_cfg = stage.model.geometry(stage.vocab_ids)
    t_cfg, t_params = stage.load_teacher(s_cfg)
    plain = stage.module(t_cfg, c.teacher.dtype)
    q, teacher = quant.plan(plain, c.teacher.quant), quant.quantized(plain, c.teacher.quant)  # (teacher.quant)
    t_params = quant.quantizer(q, q and q.shardings(param_shardings(plain, mesh, rules)))(t_params)
    skips = records.SkipLog(strict=c.data.strict)
    recs = stage.training_records(skips)
    pcfg = stage.pipeline_config(s_cfg, shuffle=False, num_epochs=1, pseudo_labels=None, teacher_mrope_gaps=None,
                                 pack=False)  # entries are per record: one per row
    batches = pipeline.make_batches(recs, stage.encoder, pcfg, skips, sizes_cache=dataset.sizes_cache(c, workdir))
    kd = kd_config(c)
    out = NamedSharding(mesh, sharding.batch_spec("input_ids", 3, c.data.batch_size, mesh, rules))
    fn = jax.jit(teacher_topk_fn(teacher, top_k=c.kd.top_k, temperature=kd.temperature,
                                 vocab=min(t_cfg.text.vocab_size, s_cfg.text.vocab_size), chunk=c.train.loss_chunk),
                 out_shardings=(out, out))
    path = os.path.join(workdir, "pseudo_labels")
    meta = {"temperature": kd.temperature, "top_k": c.kd.top_k, "records": len(recs), "vocab": s_cfg.text.vocab_size}
    with sharding.use_mesh(mesh, rules):
        n = write(path, batches, fn, t_params, mask=kd.mask, meta=meta,
                  place=stage.device_batch,
                  to_host=lambda x: sharding.local_rows(x, *pcfg.host_rows))
    if jax.process_index() == 0:
        print(f"wrote {n} entries (top-{c.kd.top_k}) to {path}; {skips.report()}")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/<x>.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory")
    distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
