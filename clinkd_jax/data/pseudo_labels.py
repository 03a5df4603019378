"""The pseudo-label store: cached teacher top-k log-probabilities, one entry per training record.

A store is a directory (written by `python -m clinkd_jax.train.pseudo_labels`):

    shard-<h>-of-<H>.array_record   the entries written by host h (ArrayRecord, one entry per record)
    index.npy                       (N, 3) int64: record index, shard, position in the shard
    meta.json                       how the entries were made: kd mask, temperature, top-k, vocabulary
                                    width, record count; training checks it against its own settings

Entry of record i: the positions whose prediction is distilled (the `kd.mask` rule), and at each of
them the teacher's top-k token ids and log p(token) at temperature T over the student's vocabulary.
"""

from __future__ import annotations

import io
import os

import numpy as np

from clinkd_jax import files

META = "meta.json"
INDEX = "index.npy"


def shard_name(shard: int, shards: int) -> str:
    return f"shard-{shard:05d}-of-{shards:05d}.array_record"


def encode_entry(record_index: int, positions: np.ndarray, ids: np.ndarray, logp: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, record_index=np.int64(record_index), positions=positions.astype(np.int32),
             ids=ids.astype(np.int32), logp=logp.astype(np.float32))
    return buf.getvalue()


def decode_entry(blob: bytes) -> dict:
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}


def read_meta(path: str) -> dict:
    """The store's meta.json; raises FileNotFoundError / ValueError naming the store."""
    file = os.path.join(path, META)
    if not os.path.isfile(file) or not os.path.isfile(os.path.join(path, INDEX)):
        raise FileNotFoundError(f"{path}: not a pseudo-label store (needs {META} and {INDEX}; written by "
                                "python -m clinkd_jax.train.pseudo_labels)")
    meta = files.read_json(file)  # a torn one is set aside: the store is then incomplete, as if never finished
    if not isinstance(meta, dict):
        raise FileNotFoundError(f"{path}: an incomplete pseudo-label store ({META} unreadable, set aside); write it "
                                "again with python -m clinkd_jax.train.pseudo_labels")
    return meta


def write_index(path: str, per_shard: list[list[int]], meta: dict) -> None:
    """index.npy from each shard's record indices in write order, then meta.json (written last: a store
    without it is incomplete)."""
    rows = [(r, s, j) for s, order in enumerate(per_shard) for j, r in enumerate(order)]
    buf = io.BytesIO()
    np.save(buf, np.asarray(rows, np.int64).reshape(-1, 3))
    files.write_bytes(os.path.join(path, INDEX), buf.getvalue())
    files.write_json(os.path.join(path, META), {**meta, "shards": len(per_shard), "entries": len(rows)})


class PseudoLabelReader:
    """Random access to a store by record index."""

    def __init__(self, path: str):
        self.path, self.meta = path, read_meta(path)
        index = np.load(os.path.join(path, INDEX))
        self._where = {int(r): (int(s), int(j)) for r, s, j in index}
        self._shards: dict[int, object] = {}

    def _shard(self, s: int):
        if s not in self._shards:  # opened on first use (once per grain worker process)
            import grain

            shard = os.path.join(self.path, shard_name(s, self.meta["shards"]))
            self._shards[s] = grain.sources.ArrayRecordDataSource([shard])
        return self._shards[s]

    def get(self, record_index: int) -> dict | None:
        where = self._where.get(int(record_index))
        return None if where is None else decode_entry(self._shard(where[0])[where[1]])
