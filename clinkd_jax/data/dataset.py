"""A run's data as its config names it: the training records (Med-GRIT, ShareGPT, the generated demo set, plus
extra files such as RCT corrections), the test file of each task, and the training pipeline's settings."""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import jax

from clinkd_jax import distributed
from clinkd_jax.data import demo, pipeline, records
from clinkd_jax.data import image as image_lib

log = logging.getLogger("clinkd_jax.setup")
TASKS = ("VG", "RO", "GC", "MII")


def demo_root(c, workdir) -> str:
    """The embedded demo set (data.format "demo"): data.demo_dir or <workdir>/demo_data, generated if needed.
    Process 0 writes it first; the other hosts then find it (shared workdir) or write their own copy."""
    root = c.data.demo_dir or os.path.join(workdir, "demo_data")
    kw = {"train_per_image": c.data.demo_train_per_image, "test_per_image": c.data.demo_test_per_image}
    if c.data.demo_layout != "random":  # only when set, so demo folders written before the option stay valid
        kw["layout"] = c.data.demo_layout
    if jax.process_index() == 0:
        demo.ensure(root, **kw)
    distributed.barrier("demo data")
    return demo.ensure(root, **kw)


def training_records(c, workdir, log_) -> list:
    """The run's training records (demo data generated into <workdir>/demo_data when absent)."""
    d = c.data
    if d.format == "demo":
        root = demo_root(c, workdir)
        return records.read_medgrit(os.path.join(root, "train.json"), os.path.join(root, "images"), log=log_)
    if d.format == "sharegpt":
        return [r for f in d.train_files for r in records.read_sharegpt(f, d.image_dir, log=log_,
                                                                        box_format=d.box_format)]
    return [r for f in d.train_files
            for r in records.read_medgrit(f, d.image_dir, log=log_, box_format=d.box_format, image_ext=d.image_ext)]


def eval_records(c, path: str, workdir: str, log_) -> list:
    """A Med-GRIT test file's records. Items whose image is missing are kept: evaluation scores them as misses."""
    return records.read_medgrit(path, eval_image_dir(c, workdir), log=log_, check_images=False,
                                box_format=c.data.box_format, image_ext=c.data.image_ext)


def with_extra(recs: list, files, mode: str, log_) -> list:
    """The training pool plus the records of `files` (ShareGPT, e.g. RCT corrections), appended, or
    replacing the records with the same id (mode "replace")."""
    extra = [r for f in files for r in records.read_sharegpt(f, "", log=log_)]  # (RCT writes 0-1000 boxes)
    if mode == "replace":
        corrected = {r.id for r in extra}
        recs = [r for r in recs if r.id not in corrected]
    if files:
        log.info("training pool: %d records incl. %d from %s (%s)", len(recs) + len(extra), len(extra), list(files),
                 mode)
    return recs + extra


def task_of(path: str) -> str | None:
    """'VG' | 'RO' | 'GC' | 'MII' from a file name such as Test_VG.json(l) or ..._RO_..., else None."""
    name = os.path.basename(path).upper()
    for task in ("MII", "VG", "RO", "GC"):
        if re.search(rf"(^|[_\-.]){task}([_\-.]|$)", name):
            return task
    return None


def test_files(c, workdir: str) -> dict[str, str]:
    """{task: Test_<task>.json} from eval.files or eval.data_dir + eval.tasks (demo: generated in the workdir)."""
    e = c.eval
    if e.files:
        return {task_of(f): f for f in e.files}
    data_dir = e.data_dir or (demo_root(c, workdir) if c.data.format == "demo" else "")
    return {t: os.path.join(data_dir, f"Test_{t}.json") for t in e.tasks}


def eval_image_dir(c, workdir: str) -> str:
    if c.eval.image_dir:
        return c.eval.image_dir
    if c.data.format == "demo" and not c.eval.data_dir:
        return os.path.join(demo_root(c, workdir), "images")
    return c.data.image_dir


def sizes_cache(c, workdir: str) -> str:
    """Where the measured record sizes are kept (data.sizes_cache, else in the workdir)."""
    return c.data.sizes_cache or os.path.join(workdir, "data_sizes.json")


def pipeline_config(c, token_ids: tuple[int, int], model_cfg, rows: tuple[int, int] | None,
                    **changes) -> pipeline.PipelineConfig:
    """The training pipeline's settings for a model of `model_cfg` (its image processing), whose image-pad and pad
    token ids are `token_ids`; this process loads the global batch's `rows` [start, stop) (those its devices hold,
    `sharding.process_rows`; None: all rows, for a mesh of devices this process does not run, `clinkd_jax.aot`)."""
    d = c.data
    image = image_lib.for_model(model_cfg, d.min_pixels, d.max_pixels)
    return dataclasses.replace(pipeline.PipelineConfig(
        batch_size=d.batch_size, rows=rows,
        text_buckets=tuple(d.text_buckets), patch_buckets=tuple(d.patch_buckets), image=image,
        mrope_gaps=tuple(d.mrope_gaps),
        seed=c.seed, shuffle=d.shuffle, num_epochs=d.num_epochs or None, worker_count=d.worker_count,
        read_threads=d.read_threads, strict=d.strict, pack=d.pack,
        teacher_mrope_gaps=(1, 1) if c.stage == "kd" and c.teacher.positions == "own" else None,
        pseudo_labels=(c.kd.pseudo_labels or None) if c.stage == "kd" else None,
        image_token_id=token_ids[0], pad_token_id=token_ids[1],
    ), **changes)
