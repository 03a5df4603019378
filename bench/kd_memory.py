"""The largest batch that fits: a Qwen2-VL-7B teacher distilling into a Qwen2-VL-2B student at ClinKD's
2048-token cutoff, on one accelerator — with the teacher online (its forward in the step) and with offline
pseudo-labels (top-k teacher log-probabilities read from a store; no teacher in memory).

    python bench/kd_memory.py                       # this machine's device; limit = its memory
    python bench/kd_memory.py --memory-gb 80        # another limit (e.g. planning on a CPU)

Nothing runs: each (mode, remat policy, batch) is compiled from abstract shapes and XLA's memory plan
(`compiled.memory_analysis()`: arguments + outputs - donated aliases + temporaries) is read. On a GPU/TPU
that is the plan the run would use; compiled for a CPU it is an estimate (XLA:CPU fuses and schedules
differently), said so in the header.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import train_step as bench  # noqa: E402  (geometries and the batch layout)


def abstract_batch(s, rows, topk=0):
    import jax

    from clinkd_jax.data import positions

    s = dict(s, batch=rows)
    ids, labels, pixels, grid, _ = bench.make_batch(s)
    pos, _ = positions.get_rope_index(ids, grid, image_token_id=s["vocab"] - 6)
    n = s["side"] // 14
    vis = positions.pack_vision_inputs([[(pixels[i * n * n:(i + 1) * n * n], tuple(grid[i]))] for i in range(rows)],
                                       n * n)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32),
             "labels": labels.astype(np.int32), "position_ids": pos, **vis}
    if topk:
        shape = ids.shape
        batch |= {"teacher_topk_ids": np.zeros((*shape, topk), np.int32),
                  "teacher_topk_logp": np.zeros((*shape, topk), np.float32),
                  "teacher_topk_valid": np.zeros(shape, bool)}
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def step_bytes(args, remat, rows, online):
    """(bytes XLA plans for one KD step with the train state donated, of which arguments), compiled from
    abstract shapes."""
    import jax

    from clinkd_jax.models import Qwen2VL
    from clinkd_jax.train import losses
    from clinkd_jax.train import state as state_lib
    from clinkd_jax.train import steps as steps_lib

    model = Qwen2VL(bench.model_config(bench.SIZES[args.student]), dtype="bfloat16", remat=remat,
                    attention_impl=args.attention)
    tx = state_lib.optimizer_for(model, state_lib.OptimConfig(mu_dtype=args.mu_dtype))
    teacher = t_params = None
    if online:  # a published checkpoint's weights load in bfloat16
        teacher = Qwen2VL(bench.model_config(bench.SIZES[args.teacher]), dtype="bfloat16", param_dtype="bfloat16",
                          attention_impl=args.attention)
        t_params = state_lib.param_shapes(teacher)
    fn = jax.jit(functools.partial(steps_lib.train_step, model=model, tx=tx, teacher=teacher, kd=losses.KDConfig(),
                                   chunk=args.chunk, frozen=("visual/.*",)), donate_argnums=(0,))
    batch = abstract_batch(bench.SIZES[args.student], rows, topk=0 if online else args.top_k)
    m = fn.lower(state_lib.abstract_state(model, tx), t_params, batch).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
            m.argument_size_in_bytes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="2b")
    ap.add_argument("--teacher", default="7b")
    ap.add_argument("--memory-gb", type=float, default=0.0, help="the limit ('0': the device's own memory)")
    ap.add_argument("--remat", default="none,minimal_with_context,full")
    ap.add_argument("--modes", default="online,pseudo_labels")
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--mu-dtype", default="")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()

    import jax

    dev = jax.devices()[0]
    limit = args.memory_gb * 2**30 or (dev.memory_stats() or {}).get("bytes_limit", 0)
    if not limit:
        raise SystemExit(f"{dev.device_kind} reports no memory limit: pass --memory-gb")
    print(machine.describe())
    print(f"{args.teacher} teacher -> {args.student} student, {bench.SIZES[args.student]['length']} tokens per row, "
          f"limit {limit / 2**30:.1f} GiB, XLA plan compiled for {dev.platform} ({dev.device_kind})"
          + (" — an estimate of an accelerator's plan" if dev.platform == "cpu" else ""))
    for mode in args.modes.split(","):
        for remat in args.remat.split(","):
            rows, fits, line = 2, 0, []  # kd.sum_rows=2: rows come in pairs (the released micro-batch)
            while rows <= args.max_rows:
                need, held = step_bytes(args, remat, rows, mode == "online")
                line.append(f"{rows}: {need / 2**30:.1f} ({held / 2**30:.1f} + {(need - held) / 2**30:.1f})")
                if need > limit:
                    break
                fits, rows = rows, rows * 2
            print(f"{mode:13} remat={remat:21} GiB by rows (arguments + the rest)  {', '.join(line)}  "
                  f"-> largest batch that fits: {fits}", flush=True)


if __name__ == "__main__":
    main()
