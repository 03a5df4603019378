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


HUGETLB = "glibc.malloc.hugetlb"


def set_malloc_hugepages(on: bool) -> None:
    """GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (as launch/env.sh sets it) or not, for the child processes that
    a benchmark starts next: both frameworks run with the same setting."""
    keep = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(HUGETLB)]
    os.environ["GLIBC_TUNABLES"] = ":".join(keep + [HUGETLB + "=1"] * bool(on))


def add_malloc_flag(ap) -> None:
    ap.add_argument("--malloc-hugepages", type=int, default=1, choices=(0, 1),
                    help="glibc malloc on transparent huge pages, for both frameworks (as launch/env.sh sets it)")


def describe(devices: str = "") -> str:
    """One header line: CPU model, cores usable by this process, vector extensions, versions (and the
    accelerator, when `devices` names one)."""
    flags = cpu_flags()
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    libs = versions("jax", "jaxlib", "flax", "torch", "transformers", "numpy")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (f"machine: {cpu_model()}, {cores()} cores ({simd}){', ' + devices if devices else ''}; "
            + ", ".join(f"{k} {v}" for k, v in libs.items()) + (f"; GLIBC_TUNABLES={tunables}" if tunables else ""))


if __name__ == "__main__":
    print(describe())
