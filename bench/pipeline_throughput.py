"""Input-pipeline throughput on the bundled demo data (samples/s and batches/s), host CPU only.

    python bench/pipeline_throughput.py [--batch_size 8] [--epochs 4] [--read_threads 2] [--workers 0]

Prints one line per setting; the first epoch is reported separately (it includes PNG decoding of a
cold page cache and tokenizer warm-up).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from clinkd_jax.data import demo, pipeline, text
from clinkd_jax.data.image import ImageConfig
from clinkd_jax.data.records import read_medgrit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--read_threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--max_pixels", type=int, default=448 * 448)
    args = ap.parse_args()

    d = tempfile.mkdtemp()
    demo.generate(d, max_side=512)
    recs = read_medgrit(f"{d}/train.json", f"{d}/images")
    enc = text.ChatEncoder(text.load_tokenizer(text.bundled_qwen2_tokenizer_dir()), "qwen2vl")
    base = dict(batch_size=args.batch_size, text_buckets=(256, 512, 1024), patch_buckets=(256, 1024),
                image=ImageConfig(max_pixels=args.max_pixels), read_threads=args.read_threads,
                worker_count=args.workers)
    for epochs in (1, args.epochs):
        cfg = pipeline.PipelineConfig(num_epochs=epochs, **base)
        start = time.perf_counter()
        n_batches = n_samples = 0
        for b in pipeline.make_batches(recs, enc, cfg):
            n_batches += 1
            n_samples += int(b["sample_mask"].sum())
        dt = time.perf_counter() - start
        print(f"epochs={epochs} batch={args.batch_size} threads={args.read_threads} workers={args.workers} "
              f"max_pixels={args.max_pixels}: {n_samples / dt:.1f} samples/s, {n_batches / dt:.2f} batches/s "
              f"({n_samples} samples in {dt:.2f}s)")


if __name__ == "__main__":
    main()
