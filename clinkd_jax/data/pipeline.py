"""Grain input pipeline: records -> static-shape batches for the jitted steps.

    MapDataset.source(this host's records) -> seeded shuffle (reshuffled every epoch) -> repeat
      -> preprocess (image patches, tokens/labels, positions)       [threads or worker processes]
      -> bucket by (text length, patch count) and batch            [main process; counts skips]

Each batch is a dict of NumPy arrays (B = batch size, L = text bucket, N = patch bucket):
    input_ids            (B, L)    int32   right-padded with the pad id
    attention_mask       (B, L)    int32   1 = real token
    labels               (B, L)    int32   token id where supervised, -100 elsewhere (not shifted)
    position_ids         (3, B, L) int32   M-RoPE / MCG-RoPE ids (gaps from the config)
    decode_offsets       (B,)      int32   position of KV slot c is c + offset
    pixel_values         (B, N, 1176) float32  patches in merge-window order, zero padded
    vision_position_ids  (B, N, 2) int32   (row, col) of each patch
    vision_segment_ids   (B, N)    int32   image number of each patch, 0 = padding
    sample_mask          (B,)      int32   0 for the filler rows that complete a last partial batch
    teacher_position_ids (3, B, L) int32   only with `teacher_mrope_gaps` (teacher on its own M-RoPE ids)
    index                (B,)      int64   position of the sample in the (shuffled, repeated) stream, -1 = filler
    record_index         (B,)      int64   position of the sample's record in the input list, -1 = filler
    teacher_topk_ids / _logp (B, L, k), teacher_topk_valid (B, L): only with `pseudo_labels`

A whole epoch compiles at most once per (text bucket, patch bucket) pair. Bad items never stop an
epoch: they are skipped, counted by reason (`SkipLog`) and reported at the end of every epoch (logger
"clinkd_jax.data"); `strict=True` raises instead,
naming the file and item. The iterator's state (`get_state`/`set_state`) is small (indices, not
arrays) and restores exactly, partially filled buckets included.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np

from clinkd_jax.data import image as image_lib
from clinkd_jax.data import positions
from clinkd_jax.data import text as text_lib
from clinkd_jax.data.records import Record, SkipLog

log_ = logging.getLogger("clinkd_jax.data")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 2
    text_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # padded lengths; the last is the cutoff
    patch_buckets: tuple[int, ...] = (256, 1024, 2304, 4096)  # per-sample patch slots (multiples of 4)
    image: image_lib.ImageConfig = image_lib.ImageConfig(max_pixels=768 * 768)  # ClinKD's training budget
    mrope_gaps: tuple[int, int] = positions.CLINKD_GAPS  # (1, 1) = plain Qwen2-VL
    teacher_mrope_gaps: tuple[int, int] | None = None  # set: batches also carry teacher_position_ids
    pseudo_labels: str | None = None  # cached teacher top-k file: batches also carry teacher_topk_*
    image_token_id: int = 151655
    pad_token_id: int = 151643
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None = repeat forever
    drop_remainder: bool = False  # False: the last partial batch of a bucket is completed with filler rows
    worker_count: int = 0  # >0: grain worker processes for preprocessing
    read_threads: int = 2
    strict: bool = False
    shard_index: int = 0  # this host
    shard_count: int = 1  # hosts


@dataclasses.dataclass
class Skip:
    reason: str
    where: str
    detail: str = ""


class Preprocess:
    """Record -> one sample (unpadded arrays) or a `Skip`. Picklable, for grain worker processes."""

    def __init__(self, cfg: PipelineConfig, encoder: text_lib.ChatEncoder):
        self.cfg, self.encoder = cfg, encoder
        self._cache = None

    def __call__(self, index: int, item: tuple[int, Record]):
        record_index, record = item
        cfg = self.cfg
        try:
            patches, grids = [], []
            for path in record.images:
                p, g = image_lib.preprocess(image_lib.load_image(path), cfg.image)
                patches.append(p)
                grids.append(g)
        except image_lib.ImageError as e:
            return index, Skip("unreadable image", record.source, str(e))
        n_patches = sum(len(p) for p in patches)
        if n_patches > cfg.patch_buckets[-1]:
            return index, Skip("too many image patches", record.source, f"{n_patches} > {cfg.patch_buckets[-1]}")
        merge = cfg.image.merge_size**2
        try:
            enc = self.encoder.encode(record.turns, [len(p) // merge for p in patches], cfg.text_buckets[-1])
        except text_lib.TooLong as e:
            return index, Skip("longer than the longest text bucket", record.source, str(e))
        pos, _ = positions.get_rope_index(
            enc.input_ids[None], np.asarray(grids).reshape(-1, 3), image_token_id=cfg.image_token_id,
            spatial_merge_size=cfg.image.merge_size, gap_in=cfg.mrope_gaps[0], gap_out=cfg.mrope_gaps[1],
        )
        sample = {"input_ids": enc.input_ids, "labels": enc.labels, "position_ids": pos[:, 0],
                  "images": list(zip(patches, grids)), "n_patches": n_patches}
        if cfg.teacher_mrope_gaps is not None:
            t_pos, _ = positions.get_rope_index(
                enc.input_ids[None], np.asarray(grids).reshape(-1, 3), image_token_id=cfg.image_token_id,
                spatial_merge_size=cfg.image.merge_size, gap_in=cfg.teacher_mrope_gaps[0], gap_out=cfg.teacher_mrope_gaps[1],
            )
            sample["teacher_position_ids"] = t_pos[:, 0]
        sample["record_index"] = record_index
        if cfg.pseudo_labels:
            if self._cache is None:  # opened lazily: once per worker process
                from clinkd_jax.train.pseudo_labels import PseudoLabelReader

                self._cache = PseudoLabelReader(cfg.pseudo_labels)
            entry = self._cache.get(record_index)
            if entry is None:
                return index, Skip("no cached pseudo-labels", record.source, cfg.pseudo_labels)
            n = len(enc.input_ids)
            if len(entry["positions"]) and entry["positions"].max() >= n:
                raise ValueError(f"{cfg.pseudo_labels}: entry for {record.source} does not match its tokens "
                                 "(written with another tokenizer, template or buckets?)")
            k = entry["ids"].shape[1]
            ids, logp, valid = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32), np.zeros((n,), bool)
            ids[entry["positions"]], logp[entry["positions"]], valid[entry["positions"]] = entry["ids"], entry["logp"], True
            sample.update(teacher_topk_ids=ids, teacher_topk_logp=logp, teacher_topk_valid=valid)
        return index, sample


def bucket_of(sample, cfg: PipelineConfig) -> tuple[int, int]:
    t = cfg.text_buckets[bisect.bisect_left(cfg.text_buckets, len(sample["input_ids"]))]
    n = cfg.patch_buckets[bisect.bisect_left(cfg.patch_buckets, sample["n_patches"])]
    return t, n


def collate(samples: Sequence[dict], indices: Sequence[int], bucket: tuple[int, int], cfg: PipelineConfig) -> dict:
    """Pad `samples` (<= batch_size; filler rows added) into one static-shape batch."""
    length, n_patches = bucket
    b = cfg.batch_size
    ids = np.full((b, length), cfg.pad_token_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), text_lib.IGNORE, np.int32)
    pos = np.zeros((3, b, length), np.int32)
    offsets = np.zeros((b,), np.int32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n], pos[:, i, :n] = s["input_ids"], 1, s["labels"], s["position_ids"]
        offsets[i] = s["position_ids"].max() + 1 - length
    vision = positions.pack_vision_inputs(
        [s["images"] for s in samples] + [[]] * (b - len(samples)), n_patches, cfg.image.merge_size
    )
    sample_mask = np.zeros((b,), np.int32)
    sample_mask[: len(samples)] = 1
    index = np.full((b,), -1, np.int64)
    index[: len(samples)] = indices
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos,
           "decode_offsets": offsets, **vision, "sample_mask": sample_mask, "index": index}
    if samples and "teacher_position_ids" in samples[0]:
        t_pos = np.zeros((3, b, length), np.int32)
        for i, s in enumerate(samples):
            t_pos[:, i, : len(s["input_ids"])] = s["teacher_position_ids"]
        out["teacher_position_ids"] = t_pos
    out["record_index"] = np.full((b,), -1, np.int64)
    out["record_index"][: len(samples)] = [s["record_index"] for s in samples]
    if samples and "teacher_topk_ids" in samples[0]:
        k = samples[0]["teacher_topk_ids"].shape[1]
        for key, dtype in (("teacher_topk_ids", np.int32), ("teacher_topk_logp", np.float32), ("teacher_topk_valid", bool)):
            arr = np.zeros((b, length, k) if key != "teacher_topk_valid" else (b, length), dtype)
            for i, s in enumerate(samples):
                arr[i, : len(s["input_ids"])] = s[key]
            out[key] = arr
    return out


class BatchIterator:
    """Buckets preprocessed samples and emits full batches; checkpointable by indices.

    State = the upstream grain iterator's state + the stream indices waiting in each bucket + the skip
    counts. Restoring re-reads the waiting samples by index (random access), so no arrays are stored.
    """

    def __init__(self, samples: grain.MapDataset, upstream: grain.IterDataset, cfg: PipelineConfig, log: SkipLog,
                 epoch_size: int):
        self._samples, self._upstream, self.cfg, self.log = samples, upstream, cfg, log
        self._it = iter(upstream)
        self._pending: dict[tuple[int, int], list[tuple[int, dict]]] = {}
        self._flushing: list[tuple[tuple[int, int], list]] | None = None
        self.batches = 0
        self.epoch_size, self.epoch = epoch_size, 0

    def _epoch_done(self):
        self.epoch += 1
        message = f"epoch {self.epoch} of this host's data: {self.log.report()}"
        (log_.warning if self.log.total else log_.info)(message)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        cfg = self.cfg
        while self._flushing is None:
            try:
                index, sample = next(self._it)
            except StopIteration:
                self._flushing = sorted(self._pending.items()) if not cfg.drop_remainder else []
                self._pending = {}
                self._epoch_done()
                break
            if index and index % self.epoch_size == 0:
                self._epoch_done()
            if isinstance(sample, Skip):
                self.log.skip(sample.reason, sample.where, sample.detail)
                continue
            key = bucket_of(sample, cfg)
            waiting = self._pending.setdefault(key, [])
            waiting.append((index, sample))
            if len(waiting) == cfg.batch_size:
                del self._pending[key]
                return self._emit(key, waiting)
        if self._flushing:
            key, waiting = self._flushing.pop(0)
            return self._emit(key, waiting)
        raise StopIteration

    def _emit(self, key, waiting):
        self.batches += 1
        return collate([s for _, s in waiting], [i for i, _ in waiting], key, self.cfg)

    # ------------------------------------------------------------------ checkpointing
    def get_state(self) -> dict:
        return {
            "upstream": copy.deepcopy(self._it.get_state()),
            "pending": {f"{k[0]}x{k[1]}": [i for i, _ in v] for k, v in self._pending.items()},
            "flushing": None if self._flushing is None else [[f"{k[0]}x{k[1]}", [i for i, _ in v]] for k, v in self._flushing],
            "skips": dict(self.log.counts),
            "batches": self.batches,
            "epoch": self.epoch,
        }

    def set_state(self, state: dict) -> None:
        self._it = iter(self._upstream)
        self._it.set_state(copy.deepcopy(state["upstream"]))

        def refetch(indices):
            return [(i, self._samples[i][1]) for i in indices]

        key = lambda s: tuple(int(x) for x in s.split("x"))
        self._pending = {key(k): refetch(v) for k, v in state["pending"].items()}
        self._flushing = None if state["flushing"] is None else [(key(k), refetch(v)) for k, v in state["flushing"]]
        self.log.counts.clear()
        self.log.merge(state["skips"])
        self.batches = state["batches"]
        self.epoch = state["epoch"]


class _WithIndex:
    def __call__(self, i, record):
        return i, record


def make_batches(
    records: Sequence[Record], encoder: text_lib.ChatEncoder, cfg: PipelineConfig, log: SkipLog | None = None
) -> BatchIterator:
    """The whole pipeline for this host's share of `records`."""
    log = log or SkipLog(strict=cfg.strict)
    if log.strict != cfg.strict:
        log.strict = cfg.strict
    if any(n % cfg.image.merge_size**2 for n in cfg.patch_buckets):
        raise ValueError(f"patch_buckets {cfg.patch_buckets} must be multiples of {cfg.image.merge_size**2}")
    if len(records) < cfg.shard_count:
        raise ValueError(f"{len(records)} records cannot be shared by {cfg.shard_count} hosts")
    ds = grain.MapDataset.source(records).map_with_index(_WithIndex())  # keep each record's list position
    ds = ds[cfg.shard_index :: cfg.shard_count]  # lazy: nothing read yet
    epoch_size = len(ds)
    if cfg.shuffle:
        ds = ds.seed(cfg.seed).shuffle()
    ds = ds.repeat(cfg.num_epochs)
    samples = ds.map_with_index(Preprocess(cfg, encoder))
    upstream = samples.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=2 * cfg.batch_size))
    if cfg.worker_count > 0:
        upstream = upstream.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return BatchIterator(samples, upstream, cfg, log, epoch_size)
