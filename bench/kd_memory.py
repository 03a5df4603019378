"""The largest batch that fits: a Qwen2-VL-7B teacher distilling into a Qwen2-VL-2B student at ClinKD's
2048-token cutoff (`configs/clinkd_2b_from_7b.py`), with the teacher online (its forward in the step) and from
offline pseudo-labels, per remat policy, on one device or a described TPU slice.

    python bench/kd_memory.py                        # this machine's devices; limit = their memory
    python bench/kd_memory.py --memory-gb 80         # another limit (e.g. planning on a CPU)
    python bench/kd_memory.py --topology v5p-8       # a TPU slice, compiled by libtpu's XLA (needs libtpu)

Nothing runs: the train step is built by the run's own builder (`clinkd_jax.aot.programs`, which
`python -m clinkd_jax.aot` reports in full) for the largest bucket, compiled from abstract shapes, and XLA's plan
is read (arguments + outputs - donated aliases + temporaries, per device). Compiled for a CPU it is an estimate
of an accelerator's plan (XLA:CPU fuses and schedules differently), said so in the header.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/clinkd_2b_from_7b.py")
    ap.add_argument("--topology", default="", help="a Cloud TPU slice (v5p-8, ...); '' = the local devices")
    ap.add_argument("--memory-gb", type=float, default=0.0, help="the limit per device ('0': the device's own)")
    ap.add_argument("--remat", default="none,minimal_with_context,full")
    ap.add_argument("--modes", default="online,pseudo_labels")
    ap.add_argument("--max-rows", type=int, default=32, help="per device")
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--mu-dtype", default="")
    args = ap.parse_args()

    import jax

    from clinkd_jax.aot import programs, report, slices
    from clinkd_jax.sharding import run_mesh

    if args.topology:
        s = slices.parse(args.topology)
        devices, limit, where = s.devices(), s.hbm_bytes, f"{s.name} (described; libtpu's XLA)"
    else:
        devices = jax.devices()
        limit = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
        where = f"{devices[0].platform} ({devices[0].device_kind})" + (
            " — an estimate of an accelerator's plan" if devices[0].platform == "cpu" else "")
    limit = args.memory_gb * 2**30 or limit
    if not limit:
        raise SystemExit(f"{devices[0].device_kind} reports no memory limit: pass --memory-gb")
    print(machine.describe())
    print(f"{args.config}: limit {limit / 2**30:.1f} GiB per device, {len(devices)} device(s), XLA plan compiled for "
          f"{where}")
    workdir = tempfile.mkdtemp(prefix="kd_memory_")
    for mode in args.modes.split(","):
        for remat in args.remat.split(","):
            per, fits, line = 2, 0, []  # kd.sum_rows=2: rows come in pairs (the released micro-batch)
            while per <= args.max_rows:
                c = programs.config_file(os.path.join(ROOT, args.config), stages=(), stage="kd", **{
                    "model.remat": remat, "model.attention": args.attention, "optim.mu_dtype": args.mu_dtype,
                    "data.batch_size": per * len(devices),
                    "kd.pseudo_labels": "/not/here/pseudo_labels" if mode == "pseudo_labels" else ""})
                mesh, rules = run_mesh(c, devices)
                (p,) = [p for p in programs.programs(c, workdir, mesh, rules, "largest") if p.name.startswith("train")]
                m = report.memory(p.lower(None).compile())
                line.append(f"{per}: {m['total'] / 2**30:.1f} ({m['arguments'] / 2**30:.1f} + "
                            f"{(m['total'] - m['arguments']) / 2**30:.1f})")
                if m["total"] > limit:
                    break
                fits, per = per, per * 2
            print(f"{mode:13} remat={remat:21} GiB by rows per device (arguments + the rest)  {', '.join(line)}  "
                  f"-> largest batch per device that fits: {fits}", flush=True)


if __name__ == "__main__":
    main()
