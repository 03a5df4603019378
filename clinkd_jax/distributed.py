"""Multi-process start-up and the little host-to-host traffic the runs need.

One process per host (TPU VM workers) or per GPU. `initialize` wraps `jax.distributed.initialize`:
explicit coordinator / process count / id for GPUs and localhost tests, or auto-detection on Cloud TPU
pods and SLURM. CPU processes talk through gloo (the localhost test).

Host-to-host exchange of small Python values (JSON): `allgather_json` (every host's value, in process
order) and `broadcast_json` (process 0's value); `allgather_array` (a global array's values on every host);
`barrier`. Every host must call them at the same point. Each waits at most `--collective_timeout` seconds
(`deadline`): a host that never arrives (crashed, stuck, out of step) ends the others with one line naming
the host, the collective and the stage, exit status 3, instead of an idle process forever.
Preemption: `preemption_point(step)` is True on every host at the same step once any host got SIGTERM
(JAX's preemption sync service; single-process runs use a signal handler instead, in train/loop.py).

jax 0.12.1 on CPUs hangs cross-process collectives in two ways (docs/jax-cpu-collective-hangs.md): a program with a
collective in a loop that process 0 loads from the persistent compilation cache, and a program whose source paths
differ between the processes (two checkouts). Multi-process CPU runs on such a jax turn the cache off and strip
directories from the source paths in programs (`initialize`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import traceback

import jax
import numpy as np
from jax.experimental import multihost_utils

from clinkd_jax.errors import UserError, one_line

log = logging.getLogger("clinkd_jax.distributed")
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # generous: a host may compile or read a large file before it arrives
COLLECTIVE_TIMEOUT_EXIT = 3
_settings = {"timeout_s": DEFAULT_COLLECTIVE_TIMEOUT_S, "stage": "start-up"}
# jax releases whose CPU collectives hang on a cached program with a loop collective, or on source paths that differ
# between processes (docs/jax-cpu-collective-hangs.md); tests/test_distributed.py runs the reproducer and fails the
# day a release in this range no longer hangs
CPU_HANGS_FROM = (0, 12, 1)


def define_flags() -> None:
    """The multi-process command-line flags of the entry points (clinkd_jax.main, the pseudo-label writer)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", "", "multi-process: host:port of process 0 (GPUs, localhost)")
    flags.DEFINE_integer("num_processes", 0, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", -1, "multi-process: this process's id")
    flags.DEFINE_bool("distributed", False, "multi-process with auto-detection (Cloud TPU pods, SLURM)")
    flags.DEFINE_float("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S,
                       "multi-process: seconds a host waits in one host-level collective or barrier for the others "
                       "before it stops the run with one line (exit status 3)")


def initialize_from_flags() -> bool:
    from absl import flags

    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed, f.collective_timeout)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False,
               collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> bool:
    """Join the job; returns True when running multi-process. Call before anything touches a device."""
    if collective_timeout_s <= 0:
        raise UserError(f"--collective_timeout={collective_timeout_s} must be a positive number of seconds")
    _settings["timeout_s"] = float(collective_timeout_s)
    if not (coordinator_address or auto):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only hosts; no effect on GPU/TPU
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    if jax.process_count() > 1 and cpu_collectives_hang():
        # before the first trace and compile, which is when jax reads both settings
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            log.warning("jax %s, several CPU processes: persistent compilation cache off (cached programs with "
                        "collectives in a loop hang on this release; docs/jax-cpu-collective-hangs.md)",
                        jax.__version__)
        if not jax.config.jax_hlo_source_file_canonicalization_regex:  # a user's own setting stays
            # file names without their folders: hosts whose checkouts lie in different folders run the same program
            jax.config.update("jax_hlo_source_file_canonicalization_regex", r".*/")
    return jax.process_count() > 1


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def cpu_collectives_hang() -> bool:
    """Whether this jax, on CPUs, hangs cross-process collectives (cached loop programs, differing source paths)."""
    return jax_version() >= CPU_HANGS_FROM and jax.default_backend() == "cpu"


def set_stage(name: str) -> None:
    """The stage the run is in (named by a collective that times out)."""
    _settings["stage"] = name


_last_words: list = []  # run before a collective timeout ends the process (no unwinding happens then)
LAST_WORDS_S = 20.0


@contextlib.contextmanager
def last_words(say):
    """While in this block, `say()` runs (at most LAST_WORDS_S seconds) before a collective timeout ends this
    process: what an exception would have closed on its way out (the stage's W&B run)."""
    _last_words.append(say)
    try:
        yield
    finally:
        _last_words.remove(say)


@contextlib.contextmanager
def deadline(collective: str):
    """Bounds one host-level collective: past `--collective_timeout` seconds this process prints one line and
    exits with status 3 (from a watchdog thread: the main thread is blocked inside the collective). Saved
    checkpoints stay as they are (a save in flight is left as a temporary folder, which a rerun sets aside)."""
    if jax.process_count() == 1:
        yield
        return
    done, limit, stage = threading.Event(), _settings["timeout_s"], _settings["stage"]

    def watch():
        if done.wait(limit):
            return
        print(f"collective timeout: host {jax.process_index()} of {jax.process_count()} waited {limit:g} s in "
              f"{collective} (stage {stage}) and not every host arrived (one crashed, is stuck, or is out of step); "
              f"stopping (--collective_timeout sets the limit)", file=sys.stderr, flush=True)
        for say in list(_last_words):  # each bounded: a stuck one must not keep the process from ending
            t = threading.Thread(target=say, name="last words", daemon=True)
            t.start()
            t.join(LAST_WORDS_S)
        sys.stdout.flush()
        os._exit(COLLECTIVE_TIMEOUT_EXIT)

    threading.Thread(target=watch, name=f"deadline {collective}", daemon=True).start()
    try:
        yield
    finally:
        done.set()


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


def allgather_json(obj, what: str) -> list:
    """Every host's `obj` (JSON-serialisable), in process order, on every host; `what` names it in a timeout."""
    if jax.process_count() == 1:
        return [obj]
    raw = _encode(obj)
    with deadline(f"allgather_json({what})"):
        size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
        rows = np.asarray(multihost_utils.process_allgather(_padded(raw, size)[None], tiled=True))
    return [_decode(r) for r in rows]


def broadcast_json(obj, what: str):
    """Process 0's `obj` (JSON-serialisable) on every host; the other hosts' `obj` is ignored."""
    if jax.process_count() == 1:
        return obj
    raw = _encode(obj) if jax.process_index() == 0 else np.zeros((0,), np.uint8)
    with deadline(f"broadcast_json({what})"):
        n = int(multihost_utils.broadcast_one_to_all(np.array(raw.size, np.int64)))
        return _decode(multihost_utils.broadcast_one_to_all(_padded(raw, n)))


def allgather_array(x: jax.Array, what: str) -> np.ndarray:
    """A global array's values on every host (each host gives its shards); `what` names it in a timeout."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    with deadline(f"allgather_array({what})"):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
        with deadline(f"barrier({name})"):
            multihost_utils.sync_global_devices(name)


def preemption_point(step: int) -> bool:
    """True on every host at the same step once any host received SIGTERM (multi-process runs only)."""
    return jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)
