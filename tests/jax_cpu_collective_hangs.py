"""jax 0.12.1 on CPUs: two ways a cross-process collective never finishes. No project code.

Two processes on localhost (jax.distributed, gloo collectives), one jitted program each:

* `cache`: 2 CPU devices per process, one 4-device mesh; a `lax.while_loop` whose body sums a batch-sharded array
  (an all-reduce across both processes), as generation's decode loop does. Round 1 compiles it and process 0
  writes it to the persistent compilation cache; round 2 runs the same again and loads it from there.
* `paths`: 1 CPU device per process; a sum over a batch-sharded array, the same script run from two different
  file paths (two checkouts, as two hosts with different home directories have). Round 1 as it is; round 2 with
  `jax_hlo_source_file_canonicalization_regex` set, so the source paths in the program are the same.

    python tests/jax_cpu_collective_hangs.py              # one line per round; exit 1 if a round hung
    python tests/jax_cpu_collective_hangs.py --deadline 30

jax 0.10.2 and 0.12.0.1: every round finishes in seconds. jax 0.12.1: `cache` round 2 hangs (both processes idle)
and `paths` round 1 hangs; `paths` round 2 finishes. docs/jax-cpu-collective-hangs.md; tests/test_distributed.py
runs this.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

PROGRAM = r'''
import os, sys
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if os.environ.get("CANONICAL_PATHS"):
    jax.config.update("jax_hlo_source_file_canonicalization_regex", r".*/")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
n = jax.device_count()
mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
x = jax.make_array_from_callback((2 * n, 16), NamedSharding(mesh, P("data")),
                                 lambda i: np.ones((2 * n, 16), np.float32)[i])

if os.environ["CASE"] == "cache":
    def body(carry):
        i, y = carry
        return i + 1, y + y.sum() * 1e-3  # the sum is an all-reduce over both processes

    y = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1])(x)
else:
    y = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P()))(x)
print("done", float(np.asarray(y.addressable_data(0)).sum()), flush=True)
'''
CASES = {"cache": ("compiles, writes the cache", "loads from the cache"),
         "paths": ("two file paths", "two file paths, canonical source paths")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(scripts: list[str], env: dict, deadline: float) -> tuple[bool, float, str]:
    """(finished, seconds, outputs): process i runs scripts[i]; both are killed at the deadline."""
    address, start = f"127.0.0.1:{free_port()}", time.time()
    procs = [subprocess.Popen([sys.executable, s, address, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, s in enumerate(scripts)]
    outs, finished = [], True
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, start + deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            finished = False
            for q in procs:
                q.kill()
            outs.append(p.communicate()[0])
    finished = finished and all(p.returncode == 0 and "done" in out for p, out in zip(procs, outs))
    return finished, time.time() - start, "\n".join(outs)


def run(case: str, deadline: float = 60.0) -> list[tuple[bool, float, str]]:
    """Both rounds of `case` ("cache" or "paths") in a fresh scratch directory."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "CASE": case, "JAX_ENABLE_COMPILATION_CACHE": "false"}
        for name in ("a", "b"):
            os.makedirs(os.path.join(tmp, name))
            with open(os.path.join(tmp, name, "program.py"), "w") as f:
                f.write(PROGRAM)
        a, b = (os.path.join(tmp, name, "program.py") for name in ("a", "b"))
        if case == "cache":
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_ENABLE_COMPILATION_CACHE="true",
                       JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
            rounds = [one_round([a, a], env, deadline) for _ in range(2)]
            shutil.rmtree(os.path.join(tmp, "cache"), ignore_errors=True)
            return rounds
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1")
        return [one_round([a, b], env, deadline), one_round([a, b], {**env, "CANONICAL_PATHS": "1"}, deadline)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds a round may take before it counts as hung")
    ap.add_argument("--cases", default="cache,paths")
    a = ap.parse_args()
    import jax

    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__}")
    hung = False
    for case in a.cases.split(","):
        for (ok, seconds, _), what in zip(run(case, a.deadline), CASES[case]):
            outcome = f"finished in {seconds:.1f} s" if ok else f"HUNG, killed after {seconds:.0f} s"
            print(f"{case}: {what}: {outcome}")
            hung |= not ok
    return 1 if hung else 0


if __name__ == "__main__":
    sys.exit(main())
