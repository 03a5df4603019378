"""Cloud TPU slices by the names Cloud TPU gives them, described to XLA's TPU compiler on any host.

v4 and v5p names count TensorCores (two per chip, run as one "megacore" device per chip, as JAX does on those
VMs); v5e and v6e names count chips (one TensorCore each). A device here is one chip. HBM and bf16 peak are the
chips' data-sheet figures; `jax.experimental.topologies` needs the `libtpu` wheel (it compiles, it runs nothing).
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    cores_per_chip: int  # the slice name counts cores
    hbm_bytes: int  # per chip
    peak_bf16: float  # FLOP/s per chip, dense
    hbm_bandwidth: float  # bytes/s per chip
    device_kind: str  # jax.Device.device_kind
    chip_config: str  # how the cores of a chip are exposed ("megacore": one device per chip)
    layouts: dict[int, str]  # chips -> topology


_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GENERATIONS = {
    "v4": Generation("v4", 2, 32 * GiB, 275e12, 1228e9, "TPU v4", "megacore", _3D),
    "v5p": Generation("v5p", 2, 95 * GiB, 459e12, 2765e9, "TPU v5", "megacore", _3D),
    "v5e": Generation("v5e", 1, 16 * GiB, 197e12, 819e9, "TPU v5 lite", "default", _2D),
    "v6e": Generation("v6e", 1, 32 * GiB, 918e12, 1640e9, "TPU v6 lite", "default", _2D),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as Cloud TPU spells it: v5p-8, v5e-16, ...
    generation: Generation
    chips: int

    @property
    def topology(self) -> str:
        return self.generation.layouts[self.chips]

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def peak_flops(self) -> float:
        return self.generation.peak_bf16

    def devices(self) -> list:
        """The slice's devices, described for the TPU compiler (compile only)."""
        from jax.experimental import topologies

        # compile only: no process owns a TPU, so several may load libtpu at once (else the second one stops at
        # libtpu's lockfile: two aot runs, or a test beside a benchmark)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            topo = topologies.get_topology_desc(topology_name=f"{self.generation.name}:{self.topology}",
                                                platform="tpu", chip_config_name=self.generation.chip_config)
        except RuntimeError as e:
            raise RuntimeError(f"--topology={self.name}: libtpu could not describe the slice (describing one needs "
                               f"the libtpu wheel: pip install '.[tpu]'): {e}") from None
        devices = list(topo.devices)
        if len(devices) != self.chips:
            raise RuntimeError(f"{self.name}: the TPU compiler described {len(devices)} devices for topology "
                               f"{self.topology}, expected {self.chips} chips")
        return devices


def parse(name: str) -> Slice:
    """'v5p-8' -> Slice; a clear error naming the slices it knows otherwise."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    if not m or m.group(1) not in GENERATIONS:
        raise ValueError(f"--topology={name!r}: not a Cloud TPU slice name; known: {', '.join(names())}")
    gen, count = GENERATIONS[m.group(1)], int(m.group(2))
    chips, rest = divmod(count, gen.cores_per_chip)
    if rest or chips not in gen.layouts:
        raise ValueError(f"--topology={name!r}: no such {gen.name} slice; known: "
                         f"{', '.join(n for n in names() if n.startswith(gen.name + '-'))}")
    return Slice(f"{gen.name}-{count}", gen, chips)


def names() -> list[str]:
    return [f"{g.name}-{chips * g.cores_per_chip}" for g in GENERATIONS.values() for chips in g.layouts]


def listing() -> str:
    """The `--topology=list` table."""
    rows = ["slice      chips  topology  HBM/chip   bf16 peak/chip"]
    for n in names():
        s = parse(n)
        rows.append(f"{s.name:<10} {s.chips:>5}  {s.topology:<8}  {s.hbm_bytes / GiB:>4.0f} GiB   "
                    f"{s.peak_flops / 1e12:>4.0f} TFLOP/s")
    return "\n".join(rows)
