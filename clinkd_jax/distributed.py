"""Multi-process start-up and the little host-to-host traffic the runs need.

One process per host (TPU VM workers) or per GPU. `initialize` wraps `jax.distributed.initialize`:
explicit coordinator / process count / id for GPUs and localhost tests, or auto-detection on Cloud TPU
pods and SLURM. CPU processes talk through gloo (the localhost test).
"""

from __future__ import annotations

import json

import jax
import numpy as np


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False) -> bool:
    """Join the job; returns True when running multi-process. Call before anything touches a device."""
    if not (coordinator_address or auto):
        return False
    if jax.config.jax_platforms in ("cpu",) or (jax.config.jax_platforms or "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return jax.process_count() > 1


def allgather_json(obj) -> list:
    """Every host's `obj` (JSON-serialisable), in process order, on every host."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros((size,), np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded[None], tiled=True))
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]
