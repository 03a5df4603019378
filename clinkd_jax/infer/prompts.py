"""Generation prompts on the host: Record -> chat-template prompt ids + image patches + positions,
left-padded into static (text bucket, patch bucket) batches.

Prompt contract (clinkd-spec §3.5): the first user turn of a record becomes `[image, text]` in the
chat template with the generation prompt added; the text has its `<img>…</img>` tag removed and
`<box>`/`<ref>` markup turned into Qwen2-VL's special tokens (`ChatEncoder.prompt`). Images use the
evaluation pixel budget (ClinKD: 512²–1024²).

Left padding puts every row's last prompt token at the same cache slot, so decoding writes one slot
per step for the whole batch.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from clinkd_jax.data import image as image_lib
from clinkd_jax.data import positions
from clinkd_jax.data import text as text_lib
from clinkd_jax.data.records import Record, SkipLog

EVAL_IMAGE = image_lib.ImageConfig(min_pixels=512 * 512, max_pixels=1024 * 1024)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    batch_size: int = 8  # rows per generate call (this host)
    text_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # left-padded prompt lengths
    patch_buckets: tuple[int, ...] = (1600, 2704, 4096, 5376)  # 512² px -> 1444 patches, 1024² -> <= 5329
    image: image_lib.ImageConfig = EVAL_IMAGE
    mrope_gaps: tuple[int, int] = positions.CLINKD_GAPS
    image_token_id: int = 151655
    pad_token_id: int = 151643
    threads: int = 4  # image decoding / preprocessing threads
    window: int = 8  # batches of records preprocessed ahead (bounds host memory)


class PromptSkip(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def build_prompt(record: Record, encoder: text_lib.ChatEncoder, cfg: PromptConfig) -> dict:
    """One unpadded prompt sample; raises PromptSkip naming why it cannot be generated for."""
    patches, grids = [], []
    for path in record.images:
        try:
            p, g = image_lib.preprocess(image_lib.load_image(path), cfg.image)
        except image_lib.ImageError as e:
            raise PromptSkip("unreadable image", str(e)) from None
        patches.append(p)
        grids.append(g)
    n_patches = sum(len(p) for p in patches)
    if n_patches > cfg.patch_buckets[-1]:
        raise PromptSkip("too many image patches", f"{n_patches} > {cfg.patch_buckets[-1]}")
    merge = cfg.image.merge_size**2
    ids = encoder.prompt(record.turns, [len(p) // merge for p in patches],
                         [image_lib.grid_size(g, cfg.image) for g in grids])
    if len(ids) > cfg.text_buckets[-1]:
        raise PromptSkip("prompt longer than the longest text bucket", f"{len(ids)} > {cfg.text_buckets[-1]}")
    pos, _ = positions.get_rope_index(
        ids[None], np.asarray(grids, np.int64).reshape(-1, 3), image_token_id=cfg.image_token_id,
        spatial_merge_size=cfg.image.merge_size, gap_in=cfg.mrope_gaps[0], gap_out=cfg.mrope_gaps[1],
    )
    return {"input_ids": ids, "position_ids": pos[:, 0], "images": list(zip(patches, grids)), "n_patches": n_patches}


def bucket_of(sample: dict, cfg: PromptConfig) -> tuple[int, int]:
    t = cfg.text_buckets[bisect.bisect_left(cfg.text_buckets, len(sample["input_ids"]))]
    n = cfg.patch_buckets[bisect.bisect_left(cfg.patch_buckets, sample["n_patches"])]
    return t, n


def collate_prompts(samples: Sequence[dict], bucket: tuple[int, int], cfg: PromptConfig,
                    batch_size: int | None = None) -> dict:
    """Left-pad `samples` into one static batch; rows past len(samples) are empty filler."""
    length, n_patches = bucket
    b = batch_size or cfg.batch_size
    ids = np.full((b, length), cfg.pad_token_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    pos = np.zeros((3, b, length), np.int32)
    offsets = np.zeros((b,), np.int32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, length - n:], mask[i, length - n:], pos[:, i, length - n:] = s["input_ids"], 1, s["position_ids"]
        offsets[i] = s["position_ids"].max() + 1 - length  # next position = (next cache slot) + offset
    vision = positions.pack_vision_inputs([s["images"] for s in samples] + [[]] * (b - len(samples)), n_patches,
                                          cfg.image.merge_size, patch_dim=cfg.image.patch_dim)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "decode_offsets": offsets, **vision}


def prompt_batches(
    records: Iterable[Record], encoder: text_lib.ChatEncoder, cfg: PromptConfig, log: SkipLog, repeat: int = 1,
    on_skip: Callable[[Record, str], None] | None = None,
) -> Iterator[tuple[list[Record], dict]]:
    """(records, batch) pairs; bad items are counted in `log` by reason (never raised mid-run unless
    log.strict) and passed to `on_skip(record, reason)`. `repeat` > 1 puts each prompt in `repeat`
    consecutive rows (several samples per question)."""
    per_batch = cfg.batch_size // repeat
    if per_batch < 1 or cfg.batch_size % repeat:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of repeat={repeat}")
    waiting: dict[tuple[int, int], list[tuple[Record, dict]]] = {}

    def emit(key):
        items = waiting.pop(key)
        rows = [s for _, s in items for _ in range(repeat)]
        return [r for r, _ in items], collate_prompts(rows, key, cfg)

    def build(record):
        try:
            return record, build_prompt(record, encoder, cfg)
        except PromptSkip as e:
            return record, e

    records = list(records)
    window = max(1, cfg.window) * per_batch
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        for start in range(0, len(records), window):
            for record, sample in pool.map(build, records[start:start + window]):
                if isinstance(sample, PromptSkip):
                    log.skip(sample.reason, record.source, sample.detail)
                    if on_skip is not None:
                        on_skip(record, sample.reason)
                    continue
                key = bucket_of(sample, cfg)
                waiting.setdefault(key, []).append((record, sample))
                if len(waiting[key]) == per_batch:
                    yield emit(key)
    for key in sorted(waiting):
        yield emit(key)
