"""Multi-process start-up and the little host-to-host traffic the runs need.

One process per host (TPU VM workers) or per GPU. `initialize` wraps `jax.distributed.initialize`:
explicit coordinator / process count / id for GPUs and localhost tests, or auto-detection on Cloud TPU
pods and SLURM. CPU processes talk through gloo (the localhost test).

Host-to-host exchange of small Python values (JSON): `allgather_json` (every host's value, in process
order) and `broadcast_json` (process 0's value). Every host must call them at the same point.
Preemption: `preemption_point(step)` is True on every host at the same step once any host got SIGTERM
(JAX's preemption sync service; single-process runs use a signal handler instead, in train/loop.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

import jax
import numpy as np
from jax.experimental import multihost_utils

from clinkd_jax.errors import UserError, one_line


def define_flags() -> None:
    """The multi-process command-line flags of the entry points (clinkd_jax.main, the pseudo-label writer)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", "", "multi-process: host:port of process 0 (GPUs, localhost)")
    flags.DEFINE_integer("num_processes", 0, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", -1, "multi-process: this process's id")
    flags.DEFINE_bool("distributed", False, "multi-process with auto-detection (Cloud TPU pods, SLURM)")


def initialize_from_flags() -> bool:
    from absl import flags

    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False) -> bool:
    """Join the job; returns True when running multi-process. Call before anything touches a device."""
    if not (coordinator_address or auto):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only hosts; no effect on GPU/TPU
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return jax.process_count() > 1


def describe() -> str:
    """One line naming what this process runs on (speed and float results depend on it)."""
    d = jax.devices()
    return (f"jax {jax.__version__}, {len(d)} {d[0].platform} device(s) ({d[0].device_kind}) over "
            f"{jax.process_count()} process(es), this one {jax.process_index()}; "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")


def _encode(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), np.uint8)


def _padded(raw: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size,), np.uint8)
    out[: raw.size] = raw
    return out


def _decode(row: np.ndarray):
    return json.loads(bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode())


def allgather_json(obj) -> list:
    """Every host's `obj` (JSON-serialisable), in process order, on every host."""
    if jax.process_count() == 1:
        return [obj]
    raw = _encode(obj)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    rows = np.asarray(multihost_utils.process_allgather(_padded(raw, size)[None], tiled=True))
    return [_decode(r) for r in rows]


def broadcast_json(obj):
    """Process 0's `obj` (JSON-serialisable) on every host; the other hosts' `obj` is ignored."""
    if jax.process_count() == 1:
        return obj
    raw = _encode(obj) if jax.process_index() == 0 else np.zeros((0,), np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.array(raw.size, np.int64)))
    return _decode(multihost_utils.broadcast_one_to_all(_padded(raw, n)))


@contextlib.contextmanager
def fail_fast():
    """An error on one host of a multi-process run ends that process at once, skipping jax.distributed's
    shutdown barrier: the other hosts' next collective fails within seconds, instead of every host
    waiting out the barrier's timeout (minutes)."""
    try:
        yield
    except Exception as e:
        if jax.process_count() <= 1:
            raise
        if isinstance(e, UserError):  # a setting or a data item: the one line says it (clinkd_jax.cli)
            print(one_line(e), file=sys.stderr)
        else:
            traceback.print_exc()
        print(f"process {jax.process_index()} failed; stopping it now so the other hosts stop too", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if isinstance(e, UserError) else 1)


def barrier(name: str) -> None:
    """Every host waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def preemption_point(step: int) -> bool:
    """True on every host at the same step once any host received SIGTERM (multi-process runs only)."""
    return jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)
