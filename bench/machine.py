"""What a benchmark figure was measured on: CPU model and cores (or the accelerator), library versions.

Speed is a property of code and machine (the same CPU benchmark has given 1.37x on an AMD EPYC and 0.52x
on an Intel Xeon), so every benchmark prints this header and bench/README.md keeps one table per machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def describe(devices: str = "") -> str:
    """One header line: CPU model, cores usable by this process, vector extensions, versions (and the
    accelerator, when `devices` names one)."""
    flags = cpu_flags()
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    libs = versions("jax", "jaxlib", "flax", "torch", "transformers", "numpy")
    return (f"machine: {cpu_model()}, {cores()} cores ({simd}){', ' + devices if devices else ''}; "
            + ", ".join(f"{k} {v}" for k, v in libs.items()))


if __name__ == "__main__":
    print(describe())
