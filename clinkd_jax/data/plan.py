"""The global batch plan: which records make up each global batch, decided identically on every host.

A multi-host run must agree, step by step, on the shape of every global batch and on when an epoch
ends, while each host loads only its own rows. So batches are planned from the records' sizes alone,
never from what a host happened to load:

    sizes (text tokens, image patches) of every record: image headers + tokenization, no pixels;
        each host measures a strided share, the shares are exchanged; cached in the workdir
    valid records --(seed, epoch)--> one global permutation --> (text bucket, patch bucket) queues
        a queue reaching the global batch size is the next global batch;
        at the epoch's end the partial queues follow in bucket order (completed with filler rows),
        or are dropped (drop_remainder)

Every host derives the same list, so the batches per epoch and each step's shapes agree everywhere,
and the number of batches in an epoch is known before it starts (sum over buckets of ceil(n / batch)).

Packing (`data.pack`): before any epoch, the valid records are packed once, in a seeded order, into
rows of several conversations whose tokens and patches fit the largest buckets (`pack`); the packs then
take the records' place above (shuffled per epoch, queued by the bucket their totals fit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from clinkd_jax import distributed, files
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import text as text_lib
from clinkd_jax.data.records import Record, SkipLog

log = logging.getLogger("clinkd_jax.data")
SIZES_VERSION = 2  # (text tokens, patches, exchanges dropped) per record
PROBE = "Probe <|box_start|>(12,345),(678,901)<|box_end|> of the left kidney, ct_00 x-ray."


@dataclasses.dataclass(frozen=True)
class Skip:
    """Why a record is left out (counted in the SkipLog under `reason`)."""

    reason: str
    where: str
    detail: str = ""


def record_key(record: Record) -> str:
    """A digest of everything a record's size depends on: image references (shape for decoded images)
    and the turns."""
    h = hashlib.sha1()
    for im in record.images:
        h.update((im if isinstance(im, str) else f"array{np.shape(im)}").encode() + b"\0")
    for t in record.turns:
        h.update(f"{t.role}\0{t.text}\0".encode())
    return h.hexdigest()


def size_context(encoder: text_lib.ChatEncoder, image: image_lib.ImageConfig, text_cutoff: int) -> str:
    """What measured sizes also depend on: tokenizer (and vocabulary mapping), template, box markup, image
    processing, the truncation length. A size table measured under another context is not reused."""
    tok = encoder.tok
    parts = [SIZES_VERSION, type(tok).__name__, len(tok), encoder.template, encoder.system_prompt,
             encoder._ids(PROBE), dataclasses.asdict(image), text_cutoff, encoder.box_markup]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


def measure_one(record: Record, encoder: text_lib.ChatEncoder, image: image_lib.ImageConfig,
                text_cutoff: int) -> tuple[int, int, int] | Skip:
    """(text tokens, image patches, trailing exchanges dropped to fit `text_cutoff`) of one record as the
    pipeline will build it, or why it cannot be used."""
    try:
        seen = [image_lib.seen_size(p, image) for p in record.images]  # (height, width) after resizing
        patches = [(h // image.patch_size) * (w // image.patch_size) for h, w in seen]
    except image_lib.ImageError as e:
        return Skip("unreadable image", record.source, str(e))
    try:
        enc = encoder.encode(record.turns, [n // image.merge_size**2 for n in patches], text_cutoff, seen)
    except text_lib.TooLong as e:
        return Skip("longer than the longest text bucket", record.source, str(e))
    except Exception as e:  # a literal <|image_pad|> in the text, a template error, ...: this item only
        return Skip("cannot tokenize", record.source, f"{type(e).__name__}: {e}")
    return len(enc.input_ids), sum(patches), sum(t.role == "assistant" for t in record.turns) - enc.turns_kept


class SizeTable:
    """Measured sizes by record key, for one context; kept as JSON so a resumed or chained run does not
    measure again."""

    def __init__(self, context: str, sizes: dict[str, list[int]] | None = None):
        self.context, self.sizes = context, dict(sizes or {})

    @classmethod
    def load(cls, path: str | None, context: str) -> SizeTable:
        saved = files.read_json(path) if path else None  # a torn one is named and set aside
        if isinstance(saved, dict) and saved.get("context") == context and isinstance(saved.get("sizes"), dict):
            return cls(context, saved["sizes"])
        return cls(context)  # none yet, unreadable, or another context: measure

    def save(self, path: str) -> None:
        try:
            files.write_json(path, {"context": self.context, "sizes": self.sizes}, indent=None)
        except files.DiskFull as e:  # a cache: the run goes on, measuring again next time
            log.warning("record size cache not saved: %s", e)


def same_records_everywhere(records: Sequence[Record]) -> None:
    """Every host must plan over the same list; a host that read other files would fall out of step."""
    digest = hashlib.sha1("\0".join(r.source for r in records).encode()).hexdigest()
    seen = distributed.allgather_json([len(records), digest], "training records per host")
    if any(s != seen[0] for s in seen):
        raise ValueError(f"the hosts read different training records ({[n for n, _ in seen]} records per host): "
                         "every host must see the same data files")


def measure(records: Sequence[Record], encoder: text_lib.ChatEncoder, image: image_lib.ImageConfig,
            text_cutoff: int, log_: SkipLog, *, cache: str | None = None, threads: int = 8) -> np.ndarray:
    """(N, 3) int64 (text tokens, patches, exchanges dropped) per record, -1 where the record is skipped
    (counted in `log_`).

    Multi-host: hosts agree by record index. Process 0 looks its cache up and shares the sizes, each host
    measures a strided share of the rest, the shares are exchanged: every host ends with the same sizes
    and the same skip counts (image paths, and so cache keys, may differ between hosts). Call it on
    every host at the same point.
    """
    same_records_everywhere(records)
    first = jax.process_index() == 0
    table = SizeTable.load(cache, size_context(encoder, image, text_cutoff)) if first else None
    keys = [record_key(r) for r in records] if first else None
    cached = [table.sizes.get(k, [-1, -1, 0]) for k in keys] if first else None
    known = np.asarray(distributed.broadcast_json(cached, "cached record sizes"), np.int64).reshape(len(records), 3)
    todo = np.flatnonzero(known[:, 0] < 0).tolist()
    mine = todo[jax.process_index()::jax.process_count()]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda i: measure_one(records[i], encoder, image, text_cutoff), mine))
    local = [[i, *r] if isinstance(r, tuple) else [i, r.reason, r.detail] for i, r in zip(mine, results)]
    for i, *r in (e for host in distributed.allgather_json(local, "measured record sizes") for e in host):
        if isinstance(r[0], str):
            log_.skip(r[0], records[i].source, r[1])
        else:
            known[i] = r
            if first:
                table.sizes[keys[i]] = r
    if cache and first and todo:
        table.save(cache)
    log.info("measured %d of %d records (%d cached)", len(todo), len(records), len(records) - len(todo))
    return known


# -------------------------------------------------------------------------------------- the plan
def bucket_ids(sizes: np.ndarray, text_buckets: Sequence[int], patch_buckets: Sequence[int], records=(),
               log_: SkipLog | None = None) -> np.ndarray:
    """Bucket number per record (text bucket index * len(patch_buckets) + patch bucket index); -1 = unused.
    A record with more patches than the largest patch bucket is skipped (counted)."""
    t = np.searchsorted(np.asarray(text_buckets), sizes[:, 0], side="left")
    p = np.searchsorted(np.asarray(patch_buckets), sizes[:, 1], side="left")
    ids = np.where(sizes[:, 0] < 0, -1, t * len(patch_buckets) + p)
    for i in np.flatnonzero((sizes[:, 0] >= 0) & (p >= len(patch_buckets))):
        if log_ is not None:
            log_.skip("too many image patches", records[i].source, f"{sizes[i, 1]} > {patch_buckets[-1]}")
        ids[i] = -1
    return ids


def bucket_shape(bucket_id: int, text_buckets: Sequence[int], patch_buckets: Sequence[int]) -> tuple[int, int]:
    return text_buckets[bucket_id // len(patch_buckets)], patch_buckets[bucket_id % len(patch_buckets)]


def epoch_batches(ids: np.ndarray, global_batch: int, *, seed: int, epoch: int, shuffle: bool,
                  drop_remainder: bool) -> list[tuple[int, np.ndarray]]:
    """[(bucket id, record indices (<= global_batch))] of one epoch, in step order; the same on every host."""
    order = np.flatnonzero(ids >= 0)
    if shuffle:
        order = np.random.default_rng((seed, epoch)).permutation(order)
    queues: dict[int, list[int]] = {}
    out = []
    for i in order.tolist():
        q = queues.setdefault(int(ids[i]), [])
        q.append(i)
        if len(q) == global_batch:
            out.append((int(ids[i]), np.asarray(q)))
            q.clear()
    if not drop_remainder:
        out += [(b, np.asarray(q)) for b, q in sorted(queues.items()) if q]
    return out


def pack(sizes: np.ndarray, ids: np.ndarray, text_buckets: Sequence[int], patch_buckets: Sequence[int], *,
         seed: int, window: int = 16) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Records (those with ids >= 0) packed into rows: (packs, each a tuple of record indices in row order;
    the bucket id of each pack's token and patch totals). First fit, in a seeded order, into the open packs
    whose totals stay within the largest text and patch buckets; at most `window` packs stay open (the
    oldest is closed first), which keeps the packing close to the seeded order. The same on every host."""
    cap_t, cap_p = text_buckets[-1], patch_buckets[-1]
    order = np.random.default_rng((seed, 0x9ACC)).permutation(np.flatnonzero(ids >= 0))
    open_, packs = [], []  # open_: [record indices, tokens, patches]
    for i in order.tolist():
        t, p = int(sizes[i, 0]), int(sizes[i, 1])
        for row in open_:
            if row[1] + t <= cap_t and row[2] + p <= cap_p:
                row[0].append(i)
                row[1] += t
                row[2] += p
                break
        else:
            open_.append([[i], t, p])
            if len(open_) > window:
                packs.append(open_.pop(0))
    packs += open_
    totals = np.asarray([[t, p, 0] for _, t, p in packs], np.int64).reshape(-1, 3)
    return [tuple(r) for r, _, _ in packs], bucket_ids(totals, text_buckets, patch_buckets)


def batches_per_epoch(ids: np.ndarray, global_batch: int, drop_remainder: bool) -> int:
    counts = np.bincount(ids[ids >= 0])
    return int(np.sum(counts // global_batch if drop_remainder else -(-counts // global_batch)))
