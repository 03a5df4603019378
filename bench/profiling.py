"""Where a step spends its time: the top operations by self time, for JAX (a profiler trace of the
compiled step, each XLA op named by the JAX operation it came from) and for PyTorch (torch.profiler).

    jax_top_ops(fn, compiled_text, trace_dir)   ->  rows (share, ms per call, calls, op, source)
    torch_top_ops(fn, trace_dir)                ->  torch.profiler's table, sorted by self CPU time
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{HLO instruction name: (opcode or fusion kind, the JAX op it came from)} from a compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        opcode = re.search(r"= [^=]*?\b([a-z][\w\-]*)\(", line)
        kind = re.search(r"kind=(k\w+)", line)
        source = re.search(r'op_name="([^"]*)"', line)
        name = opcode.group(1) if opcode else "?"
        if name == "fusion" and kind:
            name = f"fusion ({kind.group(1)[1:]})"
        out.setdefault(m.group(1), (name, _short(source.group(1)) if source else ""))
    return out


def _short(op_name: str) -> str:
    """The last two components of a JAX op name path, without transformation wrappers."""
    parts = [re.sub(r"^(jvp|transpose|vmap|remat|checkpoint|jit|pjit)\((.*)\)$", r"\2", p) for p in op_name.split("/")]
    return "/".join(parts[-2:])


def _events(trace_dir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no trace written under {trace_dir}")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]


def self_times(events: list[dict]) -> dict[str, list[float]]:
    """{event name: [self time in us, calls]}: each event's duration minus that of the events nested in it
    on the same thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = collections.defaultdict(lambda: [0.0, 0])

    def close(item):  # [end, name, duration, time of the nested events]
        out[item[1]][0] += max(item[2] - item[3], 0.0)

    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        stack = []
        for e in evs:
            ts, dur = float(e["ts"]), float(e.get("dur", 0))
            while stack and stack[-1][0] <= ts:
                close(stack.pop())
            if stack:
                stack[-1][3] += dur
            stack.append([ts + dur, e["name"], dur, 0.0])
            out[e["name"]][1] += 1
        while stack:
            close(stack.pop())
    return out


def jax_top_ops(run, hlo_text: str, trace_dir: str, calls: int = 3, top: int = 15) -> list[tuple]:
    """Profile `calls` runs of `run()` (already compiled and warm); rows (share of the XLA op time, ms per
    call, op, JAX source) of the `top` XLA ops by self time."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            run()
    with open(os.path.join(trace_dir, "compiled_hlo.txt"), "w") as f:
        f.write(hlo_text)  # names the ops of the trace
    sources = hlo_sources(hlo_text)
    times = {name: t for name, t in self_times(_events(trace_dir)).items() if name in sources}
    grouped = collections.defaultdict(float)  # by (opcode, source): a fusion repeated per layer counts once
    for name, (us, _) in times.items():
        grouped[sources[name]] += us
    total = sum(grouped.values()) or 1.0
    rows = sorted(grouped.items(), key=lambda kv: -kv[1])
    kinds = collections.defaultdict(float)
    for (op, src), us in rows:
        kinds[kind_of(op, src)] += us / 1000 / calls
    return [(us / total, us / 1000 / calls, op, src) for (op, src), us in rows[:top]], dict(kinds)


def kind_of(op: str, source: str) -> str:
    """A coarse class of an XLA op, for the per-class totals."""
    if op.startswith(("dot", "convolution")) or source.endswith(("dot_general", "conv_general_dilated")):
        return "matmul"
    if op.startswith(("copy", "transpose")) or source.endswith("transpose"):
        return "copy / transpose"
    if "dynamic_update_slice" in source or "dynamic_slice" in source or op.startswith("dynamic"):
        return "slicing (scan carries)"
    return "elementwise / reduce"


def format_jax(rows, kinds: dict[str, float]) -> str:
    total = sum(kinds.values())
    lines = [f"XLA ops, self time per step: {total:.1f} ms; "
             + ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])),
             f"{'share':>6} {'ms':>8}  {'op':24} source (JAX op)"]
    lines += [f"{share:6.1%} {ms:8.2f}  {op[:24]:24} {src}" for share, ms, op, src in rows]
    return "\n".join(lines)


def torch_top_ops(run, calls: int = 3, top: int = 15) -> str:
    """torch.profiler's table of `calls` runs of `run()`, by self CPU time (times summed over the calls)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
    return f"torch.profiler, {calls} call(s) summed:\n{table}"
