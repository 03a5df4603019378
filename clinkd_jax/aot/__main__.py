"""Compile a run's programs ahead of time for a TPU slice (or the local devices) and report fit and cost.

    python -m clinkd_jax.aot --config=configs/clinkd_2b_from_7b.py --topology=v5p-8 [--json=FILE] [--config.x=y]
    python -m clinkd_jax.aot --topology=list

Nothing runs and no weights are read: each program the config's stage(s) would compile (train steps per bucket,
generation as evaluation and RCT use it; `clinkd_jax.aot.programs`) is compiled from abstract shapes with XLA's
compiler for the slice (`libtpu`, `jax.experimental.topologies`). Per program and bucket it prints the bytes per
chip against the chip's HBM, the model FLOPs, the compiler's time estimate and the MFU it implies (estimates, not
measurements) and the collectives. Exit status 1 when something does not fit, with what to try.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time

import jax
from absl import flags
from ml_collections import config_flags

from clinkd_jax import cli, files
from clinkd_jax.aot import programs, report, slices
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.flops import PEAK_BF16
from clinkd_jax.sharding import run_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<x>.py file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "a Cloud TPU slice (v4-8, v5e-16, v5p-8, v6e-8, ...), 'list', or "
                                "'' for the local devices")
_JSON = flags.DEFINE_string("json", "", "also write the report here (a JSON list, one object per program and bucket)")
_WORKDIR = flags.DEFINE_string("workdir", "", "where a preset's compact vocabulary and demo data are made "
                               "(default: a temporary folder)")
_BUCKETS = flags.DEFINE_enum("buckets", "all", ["all", "largest"], "compile every bucket, or the largest only")
_ESTIMATE = flags.DEFINE_enum("estimate", "largest", ["all", "largest", "none"],
                              "compile the cost twins for every bucket, the largest bucket of each program, or none")
_PROGRAMS = flags.DEFINE_string("programs", "", "only programs whose name starts with one of these (comma list)")

HINT = ("does not fit: try model.remat=full (now {remat}), a wider fsdp axis (mesh.shape, now {mesh}), a smaller "
        "per-chip batch (data.batch_size, now {batch}), kd.pseudo_labels instead of the online teacher, "
        "optim.mu_dtype=bfloat16")


def _target():
    """(devices, HBM bytes per device, peak FLOP/s and HBM bytes/s per device or None, label)."""
    if _TOPOLOGY.value:
        s = slices.parse(_TOPOLOGY.value)
        label = (f"{s.name} ({s.chips} chips, topology {s.topology}, {s.generation.device_kind}; described, "
                 "compiled by libtpu's XLA, nothing runs)")
        return s.devices(), s.hbm_bytes, s.peak_flops, s.generation.hbm_bandwidth, label
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    hbm = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
    return devices, int(hbm), PEAK_BF16.get(devices[0].device_kind), None, \
        f"the local devices ({len(devices)} x {devices[0].device_kind})"


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if _TOPOLOGY.value == "list":
        print(slices.listing())
        return
    if _CONFIG.value is None:
        cli.fail("config error: --config is required (or --topology=list)")
    c = _CONFIG.value
    if _JSON.value:  # before minutes of compiling, not after
        cli.writable(_JSON.value, "json", suffixes=(".json",))
    try:
        devices, hbm, peak, bandwidth, label = _target()
        mesh, rules = run_mesh(c, devices)
        workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="clinkd_aot_")
        progs = programs.programs(c, workdir, mesh, rules, _BUCKETS.value)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    wanted = tuple(p for p in _PROGRAMS.value.split(",") if p)
    progs = [p for p in progs if not wanted or p.name.startswith(wanted)]
    print(f"== compiling {len(progs)} program(s) for {label}; mesh {dict(mesh.shape)}")
    largest = {}
    for p in progs:
        largest[(p.stage, p.name)] = max(largest.get((p.stage, p.name), p.bucket), p.bucket)
    entries, chips = [], mesh.size
    for p in progs:
        t0 = time.perf_counter()
        entry = {"program": p.name, "stage": p.stage, "bucket": f"{p.bucket[0]}x{p.bucket[1]}",
                 "hbm_bytes": hbm, "flops": p.flops, "est_seconds": None, "est_mfu": None,
                 "collectives": {k: {"count": 0, "bytes": 0.0} for k in report.KINDS}, "notes": list(p.notes)}
        try:
            lowered = p.lower(None)
            entry["arguments_global"] = sum(math.prod(a.shape) * a.dtype.itemsize
                                            for a in jax.tree.leaves(lowered.args_info))
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler refuses a program that cannot fit
            need = report.out_of_memory(str(e))
            if need is None:
                raise
            entry |= {"fits": False, "bytes": {"arguments": 0, "outputs": 0, "temp": 0, "alias": 0, "code": 0,
                                               "total": max(need, 0) + p.resident}}
            entry["notes"].append("the compiler ran out of device memory: " + str(e).splitlines()[0][:300])
        else:
            b, hlo = report.memory(compiled), compiled.as_text()
            b["total"] += p.resident
            entry |= {"bytes": b, "fits": b["total"] <= hbm, "collectives": report.collectives(hlo),
                      "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"')}
            if p.resident:
                entry["notes"].append(f"total includes {report.fmt_bytes(p.resident)} of optimizer state held by "
                                      "the training it runs in")
            if _ESTIMATE.value == "all" or (_ESTIMATE.value == "largest" and p.bucket == largest[(p.stage, p.name)]):
                est = programs.estimate(p, lambda lowered: report.cost(lowered.compile()))
                entry |= report.time_estimate(est, peak, bandwidth)
                if entry["est_seconds"] and peak:
                    entry["est_mfu"] = p.flops / chips / (entry["est_seconds"] * peak)
        entry["compile_seconds"] = round(time.perf_counter() - t0, 1)
        entries.append(entry)
        print(report.format_entry(entry), flush=True)
    if _JSON.value:
        files.write_json(_JSON.value, entries, indent=1)
        print(f"report written to {_JSON.value}")
    if not all(e["fits"] for e in entries):
        bad = ", ".join(f"{e['stage']}/{e['program']} {e['bucket']}" for e in entries if not e["fits"])
        print(f"{bad}: " + HINT.format(remat=c.model.remat, mesh=tuple(c.mesh.shape), batch=c.data.batch_size),
              file=sys.stderr)
        sys.exit(1)
    print(f"all {len(entries)} program(s) fit")


if __name__ == "__main__":
    cli.run(main)
