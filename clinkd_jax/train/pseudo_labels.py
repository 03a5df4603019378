"""Offline pseudo-labels: the teacher's top-k log-probabilities per distilled token, cached once in an
ArrayRecord file, for when teacher and student do not fit on the devices together.

Write (one pass of the teacher over the training records, in record order):
    python -m clinkd_jax.train.pseudo_labels --config=configs/x.py --workdir=DIR --top_k=64
Train from it: `--config.stage=kd --config.kd.pseudo_labels=DIR/pseudo_labels.array_record`.

Each entry (record i of the training list) holds, for that sample's KD positions (the `kd.mask`
rule), the top-k token ids and log p_teacher(token) at temperature T over the student's vocabulary.
The loss then sums p (log p - log q) over the k stored tokens only (no renormalisation), which is
the online KL exactly when k covers the vocabulary and a lower bound otherwise.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100


def encode_entry(record_index: int, positions: np.ndarray, ids: np.ndarray, logp: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, record_index=np.int64(record_index), positions=positions.astype(np.int32),
             ids=ids.astype(np.int32), logp=logp)
    return buf.getvalue()


def decode_entry(blob: bytes) -> dict:
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}


def kd_positions(labels_bl: np.ndarray, mask: str) -> np.ndarray:
    """(B, L) bool: positions whose prediction is distilled ("released": unshifted labels; "aligned")."""
    if mask == "released":
        return labels_bl != IGNORE
    nxt = np.concatenate([labels_bl[:, 1:], np.full((labels_bl.shape[0], 1), IGNORE)], axis=1)
    return nxt != IGNORE


def teacher_topk_fn(teacher, *, top_k: int, temperature: float, vocab: int, chunk: int = 256):
    """jit-able (params, batch) -> (ids (B, L, k) int32, logp (B, L, k) float32), chunked over positions."""
    from clinkd_jax.train import steps

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


class PseudoLabelReader:
    """Random access to a pseudo-label file by record index (through its `.index.npy` sidecar)."""

    def __init__(self, path: str):
        import grain

        self.path = path
        self._source = grain.sources.ArrayRecordDataSource([path])
        order = np.load(path + ".index.npy")  # order[j] = record index of entry j
        self._where = {int(r): j for j, r in enumerate(order)}

    def get(self, record_index: int) -> dict | None:
        j = self._where.get(int(record_index))
        return None if j is None else decode_entry(self._source[j])


def write(path: str, batches, topk_fn, params, *, mask: str, to_device=lambda b: b) -> int:
    """Run the teacher over `batches` (one epoch, any order) and write every real sample's entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    order = []
    try:
        for batch in batches:
            ids, logp = jax.device_get(topk_fn(params, to_device(batch)))
            where = kd_positions(batch["labels"], mask) & batch["attention_mask"].astype(bool)
            for i in np.flatnonzero(batch["sample_mask"]):
                pos = np.flatnonzero(where[i])
                writer.write(encode_entry(batch["record_index"][i], pos, ids[i, pos], logp[i, pos]))
                order.append(int(batch["record_index"][i]))
    finally:
        writer.close()
    np.save(path + ".index.npy", np.asarray(order, np.int64))
    return len(order)


def main(argv):
    """Write `<workdir>/pseudo_labels.array_record` with the config's teacher over its training data."""
    del argv
    import os

    from absl import flags

    from clinkd_jax import sharding
    from clinkd_jax.models.qwen2vl import Qwen2VL
    from clinkd_jax.data import pipeline
    from clinkd_jax.train import loop
    from clinkd_jax.train.config import kd_config

    c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(tuple(c.mesh.shape))
    s_cfg = loop.config_of(c.model, loop.compact_vocab(c, workdir))
    t_cfg, t_params = loop.load_model(c.teacher, mesh, c.seed + 1, s_cfg.vocab_ids)
    loop.same_vocab(s_cfg, t_cfg, "the teacher")
    teacher = Qwen2VL(t_cfg, dtype=c.teacher.dtype, attention_impl=c.model.attention)
    recs, encoder, pcfg, skips = loop.build_data(c, workdir, s_cfg.vocab_ids)
    import dataclasses

    pcfg = dataclasses.replace(pcfg, shuffle=False, num_epochs=1, pseudo_labels=None)
    kd = kd_config(c)
    fn = jax.jit(teacher_topk_fn(teacher, top_k=c.kd.top_k, temperature=kd.temperature,
                                 vocab=min(t_cfg.text.vocab_size, s_cfg.text.vocab_size), chunk=c.train.loss_chunk))
    path = os.path.join(workdir, "pseudo_labels.array_record")
    with sharding.use_mesh(mesh):
        n = write(path, pipeline.make_batches(recs, encoder, pcfg, skips), fn, t_params, mask=kd.mask,
                  to_device=lambda b: loop.to_global(b, mesh))
    print(f"wrote {n} entries (top-{c.kd.top_k}) to {path}; {skips.report()}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/<x>.py file", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
