"""What a compiled program tells without running: bytes per device, the collectives in its HLO, and XLA's
cost analysis.

Bytes: `compiled.memory_analysis()` (arguments, outputs, temporaries, donated aliases; per device). Collectives:
read from the optimized HLO, each with the bytes of its result, counted as often as the loops around it run
(a while loop's known trip count). Cost: `compiled.cost_analysis()` counts a loop's body once, so the estimate
comes from loop-free twins (`clinkd_jax.aot.programs`); "optimal_seconds" is the compiler's roofline estimate of
the program's time on the device, an estimate, not a measurement.
"""

from __future__ import annotations

import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def memory(compiled) -> dict[str, int]:
    """Per-device bytes: arguments, outputs, temporaries, aliased (donated inputs reused as outputs), and the
    total the device must hold at once (arguments + outputs - aliased + temporaries + generated code)."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] - out["alias"] + out["temp"] + out["code"]
    return out


# TPU layout custom calls that XLA's cost analysis prices at -1 s each (unknown cost) in "optimal_seconds" (their
# count matches the negative integer part of train steps' estimates). Their cost is taken as 0 (they re-label or
# crop buffers); any other unknown left makes the estimate unusable (NaN).
UNKNOWN_COST_CALLS = ("ConcatBitcast", "ZeroCrop")


def out_of_memory(message: str) -> int | None:
    """Bytes the TPU compiler said a program needs, from its out-of-memory error (-1 if it gave no figure; None if
    the error is another one): the compiler refuses a program that cannot fit instead of planning it."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    m = re.search(r"Used ([\d.]+)([KMGT])", message)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(float(m.group(1)) * scale[m.group(2)]) if m else -1


def cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of the program as compiled (per device): flops, bytes accessed, optimal_seconds (the
    -1 s of each `UNKNOWN_COST_CALLS` op added back; NaN if it is still negative)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out = {k: float(ca.get(k, float("nan"))) for k in ("flops", "bytes accessed", "optimal_seconds")}
    hlo = compiled.as_text()
    out["optimal_seconds"] += sum(hlo.count(f'custom_call_target="{t}"') for t in UNKNOWN_COST_CALLS)
    if out["optimal_seconds"] < 0:
        out["optimal_seconds"] = float("nan")
    return out


def time_estimate(cost_: dict, peak: float | None, bandwidth: float | None) -> dict:
    """{"est_seconds", "est_source", "est_flops", "est_bytes"}: XLA's own estimate ("optimal_seconds") when it
    gives one; else the roofline of XLA's counted flops and bytes on the chip, max(flops / peak, bytes /
    bandwidth) (collectives' link time left out). Both are estimates, not measurements."""
    out = {"est_flops": cost_["flops"], "est_bytes": cost_["bytes accessed"], "est_seconds": None, "est_source": None}
    if cost_["optimal_seconds"] > 0:  # (NaN is not)
        out |= {"est_seconds": cost_["optimal_seconds"], "est_source": "XLA optimal_seconds"}
    elif peak and bandwidth:
        out |= {"est_seconds": max(cost_["flops"] / peak, cost_["bytes accessed"] / bandwidth),
                "est_source": "roofline of XLA's flops and bytes (XLA gave no optimal_seconds)"}
    return out


def _array_bytes(text: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            sizes.append(n * DTYPE_BYTES[dtype])
    return sizes


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count", "bytes"}} over the optimized HLO: each collective's result bytes (per device), times the
    trip count of the loops it sits in (where XLA knows it). Async pairs count once, at their start."""
    parent: dict[str, tuple[str, int]] = {}  # loop body -> (computation holding the loop, trip count)
    ops: list[tuple[str, str, int]] = []  # (computation, kind, bytes)
    current = ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            continue
        loop = _WHILE.search(line)
        if loop:
            trip = _TRIP.search(line)
            parent[loop.group(1)] = (current, int(trip.group(1)) if trip else 1)
        op = _OP.match(line)
        if op:
            result, kind, started = op.groups()
            sizes = [s for s in _array_bytes(result) if s > 4] or _array_bytes(result)  # no sync-flag scalars
            if started and kind in ("all-gather", "collective-permute"):  # (operands, results): the results
                sizes = sizes[len(sizes) // 2:]
            ops.append((current, kind, sum(sizes)))

    def runs(comp: str, seen=()) -> int:
        if comp not in parent or comp in seen:
            return 1
        holder, trip = parent[comp]
        return trip * runs(holder, (*seen, comp))

    out = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
    for comp, kind, size in ops:
        n = runs(comp)
        out[kind]["count"] += n
        out[kind]["bytes"] += n * size
    return out


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def format_entry(e: dict) -> str:
    """One program's report, a few lines."""
    b = e["bytes"]
    head = (f"{e['stage']}/{e['program']:<24} bucket {e['bucket']:<10} {'fits' if e['fits'] else 'DOES NOT FIT'}: "
            f"{fmt_bytes(b['total'])} of {fmt_bytes(e['hbm_bytes'])} per chip (arguments {fmt_bytes(b['arguments'])}, "
            f"outputs {fmt_bytes(b['outputs'])}, temp {fmt_bytes(b['temp'])}, aliased {fmt_bytes(b['alias'])})")
    lines = [head, f"    model FLOPs per step {e['flops']:.3e}"]
    if e.get("est_seconds") is not None:
        mfu = f", MFU {100 * e['est_mfu']:.1f} %" if e.get("est_mfu") is not None else ""
        lines[-1] += (f"; estimate (compiler's counts, not a measurement): {e['est_seconds'] * 1e3:.1f} ms per call"
                      f"{mfu} [{e['est_source']}]")
    if e.get("mosaic_kernels"):
        lines[-1] += f"; {e['mosaic_kernels']} Mosaic kernel call(s) (splash attention)"
    coll = ", ".join(f"{k} {v['count']}x {fmt_bytes(v['bytes'])}" for k, v in e["collectives"].items() if v["count"])
    lines.append(f"    collectives per device: {coll or 'none'}")
    for note in e.get("notes", ()):
        lines.append(f"    note: {note}")
    return "\n".join(lines)
