"""Grain input pipeline: records -> static-shape batches for the jitted steps, on one host or many.

    sizes of all records (clinkd_jax.data.plan; measured once, shared by the hosts, cached)
      -> the epoch's global batch plan (seeded permutation, (text, patch) buckets; the same on every host)
      -> this host's rows of each global batch (`rows`)
      -> preprocess (image patches, tokens/labels, positions) and collate   [grain threads or worker processes]

Each batch is a dict of NumPy arrays (B = this host's rows, L = text bucket, N = patch bucket):
    input_ids            (B, L)    int32   right-padded with the pad id
    attention_mask       (B, L)    int32   0 = padding, else the number of the row's conversation: 1 (2, 3, ...
                                           follow in a packed row; no attention across them)
    labels               (B, L)    int32   token id where supervised, -100 elsewhere (not shifted)
    position_ids         (3, B, L) int32   M-RoPE / MCG-RoPE ids (gaps from the config)
    decode_offsets       (B,)      int32   position of KV slot c is c + offset
    pixel_values         (B, N, 3*2*p*p) float32  patches in merge-window order, zero padded
    vision_position_ids  (B, N, 2) int32   (row, col) of each patch
    vision_segment_ids   (B, N)    int32   image number of each patch, 0 = padding
    sample_mask          (B,)      int32   0 for filler rows (a last partial batch, an item that failed to load)
    record_index         (B,)      int64   position of the sample's record in the input list (packed: the
                                           first one's), -1 = filler
    teacher_position_ids (3, B, L) int32   only with `teacher_mrope_gaps` (teacher on its own M-RoPE ids)
    teacher_topk_ids / _logp (B, L, k), teacher_topk_valid (B, L): only with `pseudo_labels`

Every host yields the same number of batches per epoch with the same shapes at every step (multi-host
runs stay in lockstep); an epoch compiles at most once per (text bucket, patch bucket) pair. Bad items
never stop an epoch: items that cannot be measured are left out of the plan, items that fail to load
become filler rows; each is counted by reason (`SkipLog`, reported at the end of every epoch, logger
"clinkd_jax.data"), or raises naming the file and item with `strict=True`. The iterator's state is
(epoch, batch), the same on every host, so a run resumes exactly, also with another number of hosts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from collections.abc import Sequence

import grain
import numpy as np

from clinkd_jax import distributed, sharding
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import plan, positions
from clinkd_jax.data import text as text_lib
from clinkd_jax.data.plan import Skip
from clinkd_jax.data.pseudo_labels import PseudoLabelReader
from clinkd_jax.data.records import TRUNCATED, DataError, Record, SkipLog, skip_summary
from clinkd_jax.errors import UserError

log_ = logging.getLogger("clinkd_jax.data")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 2  # global batch: rows of one step over all hosts
    rows: tuple[int, int] | None = None  # [start, stop) of each global batch this host loads; None = all
    text_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # padded lengths; the last is the cutoff
    patch_buckets: tuple[int, ...] = (256, 1024, 2304, 4096)  # per-sample patch slots (multiples of 4)
    image: image_lib.ImageConfig = image_lib.ImageConfig(max_pixels=768 * 768)  # ClinKD's training budget
    mrope_gaps: tuple[int, int] = positions.CLINKD_GAPS  # (1, 1) = plain Qwen2-VL
    teacher_mrope_gaps: tuple[int, int] | None = None  # set: batches also carry teacher_position_ids
    pseudo_labels: str | None = None  # pseudo-label store: batches also carry teacher_topk_*
    image_token_id: int = 151655
    pad_token_id: int = 151643
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None = repeat forever
    drop_remainder: bool = False  # False: the last partial batch of a bucket is completed with filler rows
    pack: bool = False  # several conversations per row, up to the largest buckets (training; see plan.pack)
    worker_count: int = 0  # >0: grain worker processes for preprocessing
    read_threads: int = 2
    strict: bool = False

    @property
    def host_rows(self) -> tuple[int, int]:
        return self.rows or (0, self.batch_size)


class PseudoLabelMismatch(UserError):
    """A pseudo-label entry that does not fit its record's tokens: the store was made for other data."""

    kind = "data"


class Preprocess:
    """Record -> one sample (unpadded arrays) or a `Skip`. Picklable, for grain worker processes."""

    def __init__(self, cfg: PipelineConfig, encoder: text_lib.ChatEncoder):
        self.cfg, self.encoder = cfg, encoder
        self._cache = None

    def __call__(self, record_index: int, record: Record):
        try:
            return self._sample(record_index, record)
        except image_lib.ImageError as e:
            return Skip("unreadable image", record.source, str(e))
        except PseudoLabelMismatch:
            raise
        except Exception as e:  # anything else about this one item: count it, never end the epoch
            return Skip("preprocessing error", record.source, f"{type(e).__name__}: {e}")

    def _sample(self, record_index: int, record: Record):
        cfg = self.cfg
        patches, grids = [], []
        for path in record.images:
            p, g = image_lib.preprocess(image_lib.load_image(path), cfg.image)
            patches.append(p)
            grids.append(g)
        merge = cfg.image.merge_size**2
        enc = self.encoder.encode(record.turns, [len(p) // merge for p in patches], cfg.text_buckets[-1],
                                  [image_lib.grid_size(g, cfg.image) for g in grids])
        grid_arr = np.asarray(grids).reshape(-1, 3)

        def rope(gaps):
            pos, _ = positions.get_rope_index(enc.input_ids[None], grid_arr, image_token_id=cfg.image_token_id,
                                              spatial_merge_size=cfg.image.merge_size, gap_in=gaps[0], gap_out=gaps[1])
            return pos[:, 0]

        sample = {"input_ids": enc.input_ids, "labels": enc.labels, "position_ids": rope(cfg.mrope_gaps),
                  "images": list(zip(patches, grids)), "n_patches": sum(len(p) for p in patches),
                  "record_index": record_index}
        if cfg.teacher_mrope_gaps is not None:
            sample["teacher_position_ids"] = rope(cfg.teacher_mrope_gaps)
        if cfg.pseudo_labels:
            entry = self._pseudo_labels().get(record_index)
            if entry is None:
                return Skip("no cached pseudo-labels", record.source, cfg.pseudo_labels)
            n = len(enc.input_ids)
            if len(entry["positions"]) and entry["positions"].max() >= n:
                raise PseudoLabelMismatch(f"{cfg.pseudo_labels}: entry for {record.source} does not match its tokens "
                                          "(written with another tokenizer, template or data?)")
            if not np.isfinite(entry["logp"]).all():  # would be a NaN KD loss: a counted skip instead
                return Skip("non-finite pseudo-labels", record.source, f"{cfg.pseudo_labels}: NaN or Inf in the "
                            "teacher's log-probabilities")
            k = entry["ids"].shape[1]
            ids, logp, valid = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32), np.zeros((n,), bool)
            at = entry["positions"]
            ids[at], logp[at], valid[at] = entry["ids"], entry["logp"], True
            sample.update(teacher_topk_ids=ids, teacher_topk_logp=logp, teacher_topk_valid=valid)
        return sample

    def _pseudo_labels(self) -> PseudoLabelReader:
        if self._cache is None:  # opened lazily: once per worker process
            self._cache = PseudoLabelReader(self.cfg.pseudo_labels)
        return self._cache


def collate(rows: Sequence[Sequence[dict]], bucket: tuple[int, int], cfg: PipelineConfig, top_k: int = 0) -> dict:
    """Pad `rows` (each the samples of one row, in order: one, several when packed, none for a filler row)
    into one static-shape batch. The samples of a packed row follow each other; attention_mask numbers
    them (1, 2, ...: no attention across them) and each keeps its own positions from 0. `top_k`: the pseudo-label
    width when no row holds a sample to tell it (`abstract_batch`)."""
    length, n_patches = bucket
    b = len(rows)
    ids = np.full((b, length), cfg.pad_token_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), text_lib.IGNORE, np.int32)
    pos = np.zeros((3, b, length), np.int32)
    t_pos = np.zeros((3, b, length), np.int32) if cfg.teacher_mrope_gaps is not None else None
    k = next((s["teacher_topk_ids"].shape[1] for row in rows for s in row), top_k or 1) if cfg.pseudo_labels else 0
    topk = {"teacher_topk_ids": np.zeros((b, length, k), np.int32),
            "teacher_topk_logp": np.zeros((b, length, k), np.float32),
            "teacher_topk_valid": np.zeros((b, length), bool)} if k else {}
    offsets = np.zeros((b,), np.int32)
    record_index = np.full((b,), -1, np.int64)
    for i, row in enumerate(rows):
        at = 0
        for j, s in enumerate(row):
            n, span = len(s["input_ids"]), slice(at, at + len(s["input_ids"]))
            ids[i, span], mask[i, span], labels[i, span], pos[:, i, span] = (s["input_ids"], j + 1, s["labels"],
                                                                             s["position_ids"])
            labels[i, at] = text_lib.IGNORE  # a row's first token is never a target; in a pack, not the one before
            if t_pos is not None:
                t_pos[:, i, span] = s["teacher_position_ids"]
            for key, arr in topk.items():
                arr[i, span] = s[key]
            at += n
        if row:  # packed rows: the first record's index; decode offsets only mean something for one sample
            offsets[i] = row[-1]["position_ids"].max() + 1 - length
            record_index[i] = row[0]["record_index"]
    vision = positions.pack_vision_inputs([[im for s in row for im in s["images"]] for row in rows], n_patches,
                                          cfg.image.merge_size, patch_dim=cfg.image.patch_dim)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos, "decode_offsets": offsets,
           **vision, "sample_mask": np.asarray([len(row) > 0 for row in rows], np.int32),
           "record_index": record_index, **topk}
    if t_pos is not None:
        out["teacher_position_ids"] = t_pos
    return out


def empty_batch(cfg: PipelineConfig, bucket: tuple[int, int], top_k: int = 0) -> dict:
    """A global batch of filler rows in `bucket`: the fields, shapes and dtypes every batch of that bucket has
    (what `clinkd_jax.aot` compiles the step for)."""
    return collate([()] * cfg.batch_size, bucket, cfg, top_k)


class LoadBatch:
    """(bucket id, this host's rows: each a tuple of record indices, () = filler) -> (batch, skips). Picklable."""

    def __init__(self, records: Sequence[Record], cfg: PipelineConfig, encoder: text_lib.ChatEncoder):
        self.records, self.cfg, self.preprocess = records, cfg, Preprocess(cfg, encoder)

    def __call__(self, item):
        bucket_id, rows = item
        bucket = plan.bucket_shape(bucket_id, self.cfg.text_buckets, self.cfg.patch_buckets)
        out, skips = [], []
        for row in rows:
            samples = [self.preprocess(int(i), self.records[i]) for i in row]
            tokens = sum(len(s["input_ids"]) for s in samples if isinstance(s, dict))
            patches = sum(s["n_patches"] for s in samples if isinstance(s, dict))
            if tokens > bucket[0] or patches > bucket[1]:
                samples = [Skip("size changed since the batch plan", self.records[i].source,
                                f"{tokens} tokens, {patches} patches in its row; planned for {bucket}") for i in row]
            skips += [s for s in samples if isinstance(s, Skip)]
            out.append([s for s in samples if isinstance(s, dict)])
        return collate(out, bucket, self.cfg), skips


class BatchIterator:
    """This host's batches, epoch after epoch, following the global plan; checkpointable as (epoch, batch)."""

    def __init__(self, records: Sequence[Record], ids: np.ndarray, cfg: PipelineConfig, encoder, log: SkipLog,
                 plan_skips: dict[str, int] | None = None, sizes: np.ndarray | None = None):
        self.records, self.cfg, self.log = records, cfg, log
        # the units the plan shuffles and batches: records, or packs of them (`cfg.pack`), with their bucket ids
        self.units, self.ids = ([(i,) for i in range(len(records))], ids) if not cfg.pack else plan.pack(
            sizes, ids, cfg.text_buckets, cfg.patch_buckets, seed=cfg.seed)
        if cfg.pack:
            positions_of = lambda bucket_ids: sum(plan.bucket_shape(int(i), cfg.text_buckets, cfg.patch_buckets)[0]
                                                  for i in bucket_ids if i >= 0)
            log_.info("data.pack: %d records in %d rows; text positions per epoch %d unpacked -> %d packed "
                      "(%d real tokens)", int((ids >= 0).sum()), len(self.units), positions_of(ids),
                      positions_of(self.ids), int(sizes[ids >= 0, 0].sum()))
        self.plan_skips = collections.Counter(plan_skips or {})  # not read or left out of the plan: equal on all hosts
        self.load_skips: collections.Counter[str] = collections.Counter()  # failed to load on this host
        self.batches_per_epoch = plan.batches_per_epoch(self.ids, cfg.batch_size, cfg.drop_remainder)
        if self.batches_per_epoch == 0:
            raise DataError(f"no batch can be formed: {int((ids >= 0).sum())} usable of {len(records)} records "
                             f"(global batch {cfg.batch_size}, drop_remainder={cfg.drop_remainder}); {log.report()}")
        self._load = LoadBatch(records, cfg, encoder)
        planned = self.ids.astype(np.int64).tobytes() + (repr(self.units).encode() if cfg.pack else b"")
        self.fingerprint = hashlib.sha1(planned).hexdigest()
        self.epoch, self.batch, self._it = 0, 0, None

    def __iter__(self):
        return self

    def _open(self) -> None:
        cfg = self.cfg
        start, stop = cfg.host_rows
        batches = plan.epoch_batches(self.ids, cfg.batch_size, seed=cfg.seed, epoch=self.epoch, shuffle=cfg.shuffle,
                                     drop_remainder=cfg.drop_remainder)
        items = []
        for bucket_id, idx in batches[self.batch:]:
            mine = [self.units[u] for u in idx[start:stop].tolist()]
            items.append((bucket_id, tuple(mine + [()] * (stop - start - len(mine)))))  # () = a filler row
        ds = grain.MapDataset.source(items).map(self._load)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=2 * max(1, cfg.read_threads)))
        if cfg.worker_count > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
        self._it = iter(it)

    def __next__(self) -> dict:
        while True:
            if self.cfg.num_epochs is not None and self.epoch >= self.cfg.num_epochs:
                raise StopIteration
            if self._it is None:
                self._open()
            try:
                batch, skips = next(self._it)
            except StopIteration:
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
                message = f"epoch {self.epoch} ({self.batches_per_epoch} batches): {self.log.report()}"
                (log_.warning if self.log.counts else log_.info)(message)
                continue
            for s in skips:
                self.load_skips[s.reason] += 1
                self.log.skip(s.reason, s.where, s.detail)
            self.batch += 1
            return batch

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "records": len(self.records), "plan": self.fingerprint}

    def set_state(self, state: dict) -> None:
        """Continue at (epoch, batch). Another plan (the data changed) continues at the same place of it."""
        if "epoch" not in state:
            raise ValueError("the checkpoint's data state was written by an older pipeline (per-host bucket queues); "
                             "start this run in a new workdir")
        if state.get("plan") not in (None, self.fingerprint):
            log_.warning("the training data differ from the checkpoint's (%s records then, %d now): continuing at "
                         "epoch %d, batch %d of the new plan", state.get("records"), len(self.records),
                         state["epoch"], state["batch"])
        self.epoch, self.batch, self._it = int(state["epoch"]), min(int(state["batch"]), self.batches_per_epoch), None

    def skips_all_hosts(self) -> dict[str, int]:
        """Skipped items of the whole run by reason: the plan's plus every host's load failures (call on
        every host together)."""
        total = collections.Counter(self.plan_skips)
        for host in distributed.allgather_json(dict(self.load_skips), "skipped items"):
            total.update(host)
        return dict(total)


def make_batches(records: Sequence[Record], encoder: text_lib.ChatEncoder, cfg: PipelineConfig,
                 log: SkipLog | None = None, *, sizes_cache: str | None = None) -> BatchIterator:
    """The pipeline over `records` (the same list on every host); call it on every host together."""
    log = log or SkipLog(strict=cfg.strict)
    log.strict = cfg.strict
    if any(n % cfg.image.merge_size**2 for n in cfg.patch_buckets):
        raise ValueError(f"patch_buckets {cfg.patch_buckets} must be multiples of {cfg.image.merge_size**2}")
    start, stop = cfg.host_rows
    if not 0 <= start < stop <= cfg.batch_size:
        raise ValueError(f"rows {cfg.rows} are not a part of a global batch of {cfg.batch_size}")
    before = collections.Counter(log.counts)
    sizes = plan.measure(records, encoder, cfg.image, cfg.text_buckets[-1], log, cache=sizes_cache,
                         threads=4 * max(1, cfg.read_threads))
    ids = plan.bucket_ids(sizes, cfg.text_buckets, cfg.patch_buckets, records, log)
    for i in np.flatnonzero((ids >= 0) & (sizes[:, 2] > 0)):  # trained on, in part
        answers = sum(t.role == "assistant" for t in records[i].turns)
        log.skip(TRUNCATED, records[i].source, f"kept {answers - sizes[i, 2]} of {answers} exchanges")
    found = collections.Counter(log.counts) - before
    if found:
        log_.warning("batch plan over %d records: %s %s", len(records), skip_summary(found), dict(found))
    return BatchIterator(records, ids, cfg, encoder, log, log.counts, sizes)  # read + plan skips: equal on all hosts


HOST_ONLY = ("sample_mask", "decode_offsets", "record_index")  # batch fields the jitted steps do not read


def device_batch(batch: dict, mesh, rules, global_batch: int, with_records: bool = False) -> dict:
    """This host's rows of a global training batch -> the global arrays a jitted step takes; `with_records`: also
    record_index (int32), which keys the answers a step samples (clinkd_jax.train.on_policy)."""
    out = {k: v for k, v in batch.items() if k not in HOST_ONLY}
    if with_records:
        out["record_index"] = batch["record_index"].astype(np.int32)
    return sharding.place_batch(out, mesh, rules, global_batch)
