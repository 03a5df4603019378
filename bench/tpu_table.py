"""ClinKD's paper-scale training steps compiled for Cloud TPU slices on any machine (libtpu's XLA; nothing runs):
fits or not, GiB per chip, the largest per-chip batch that fits, and the compiler-count estimate of the step time
and MFU at that batch. Or, with --levers, one slice and setup with one setting changed at a time.

    python bench/tpu_table.py                                     # every setup x slice of bench/history.md
    python bench/tpu_table.py --slices v5p-8 --setups kd_7b_2b    # one cell
    python bench/tpu_table.py --levers --slices v5p-8 --setups kd_7b_2b
    python bench/tpu_table.py --setups kd_7b_2b --slices v5e-16 --set model.remat=full   # a setting on every cell

Every step is built by the run's own builder (`clinkd_jax.aot.programs`, as `python -m clinkd_jax.aot` reports
it) at the largest (text, patch) bucket (2048 tokens, 3136 patches: one 768^2 image per row). Estimates are
labelled as such: loop-free twins priced by XLA (`clinkd_jax.aot.programs.estimate`), not measurements.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GKD = {"stage": "kd", "kd.on_policy_fraction": 0.5, "kd.divergence": "jsd", "kd.max_new_tokens": 80}
# setup -> (config file, overrides[, the program when the stage compiles several]): the paper's runs, one stage each
SETUPS = {
    "sft_7b": ("configs/clinkd_qwen2vl_7b.py", {"stage": "sft"}),
    "kd_7b_2b": ("configs/clinkd_2b_from_7b.py", {"stage": "kd"}),
    "kd_7b_2b_pseudo_labels": ("configs/clinkd_2b_from_7b.py", {"stage": "kd", "kd.pseudo_labels": "/not/here"}),
    "kd_7b_7b": ("configs/clinkd_qwen2vl_7b.py", {"stage": "kd", "teacher.hf_dir": "/ckpt/Qwen2-VL-7B-Instruct"}),
    "kd_q25_7b_3b": ("configs/clinkd_qwen25vl_7b_to_3b.py", {"stage": "kd"}),  # window-attention towers
    "kd_q3_8b_2b": ("configs/clinkd_qwen3vl_8b_to_2b.py", {"stage": "kd"}),  # DeepStack, learned positions
    # on-policy distillation (configs/clinkd_2b_from_7b_onpolicy.py's kd stage): the student's 80-token answers
    # generated, then scored by the teacher and trained on, in one step
    "kd_7b_2b_on_policy": ("configs/clinkd_2b_from_7b.py", GKD, "train_kd_on_policy"),
    # LoRA: rank 16 on the LLM's attention and MLP, the rest of the paper config as it is (the base frozen)
    "sft_7b_lora": ("configs/clinkd_qwen2vl_7b.py", {"stage": "sft", "lora.rank": 16}),
    "kd_7b_2b_lora": ("configs/clinkd_2b_from_7b.py", {"stage": "kd", "lora.rank": 16}),
    # QLoRA: the frozen base's weights nf4 (lora.base_quant); a LoRA student distilled from an int8 teacher
    "sft_7b_qlora": ("configs/clinkd_qwen2vl_7b.py", {"stage": "sft", "lora.rank": 16, "lora.base_quant": "nf4"}),
    "kd_7b_2b_lora_int8": ("configs/clinkd_2b_from_7b.py", {"stage": "kd", "lora.rank": 16, "teacher.quant": "int8"}),
}
SLICES = "v4-8,v4-32,v5e-16,v5e-64,v5p-8,v5p-16,v6e-8"
LEVERS = [  # (name, overrides) against the setup as configured
    ("as configured", {}),
    ("model.remat=none", {"model.remat": "none"}),
    ("model.remat=minimal", {"model.remat": "minimal"}),
    ("model.remat=minimal_with_context", {"model.remat": "minimal_with_context"}),
    ("model.remat=dots_saveable", {"model.remat": "dots_saveable"}),
    ("model.remat=full", {"model.remat": "full"}),
    ("mesh (data 1, fsdp n/2, tensor 2)", {"mesh.shape": (1, -1, 2)}),
    ("optim.mu_dtype=bfloat16", {"optim.mu_dtype": "bfloat16"}),
    ("layers unrolled (runtime.scan_unroll=64)", {"runtime.scan_unroll": 64}),
    ("train.loss_chunk=512", {"train.loss_chunk": 512}),
    ("train.loss_chunk=1024", {"train.loss_chunk": 1024}),
    ("model.attention=xla", {"model.attention": "xla"}),
]


def measure(setup: str, slice_name: str, per_chip: int, overrides: dict, workdir: str, estimate: bool) -> dict:
    from clinkd_jax.aot import programs, report, slices
    from clinkd_jax.sharding import run_mesh

    s = slices.parse(slice_name)
    path, base, *program = SETUPS[setup]
    c = programs.config_file(os.path.join(ROOT, path), stages=(), **{
        "model.attention": "splash", **base, "data.batch_size": per_chip * s.chips, **overrides})
    mesh, rules = run_mesh(c, s.devices())
    (p,) = [p for p in programs.programs(c, workdir, mesh, rules, "largest")
            if (p.name == program[0] if program else p.name.startswith("train"))]
    out = {"setup": setup, "slice": slice_name, "per_chip": per_chip, "remat": c.model.remat,
           "mesh": dict(mesh.shape), "hbm": s.hbm_bytes}
    try:
        out["bytes"] = report.memory(p.lower(None).compile())["total"]
    except Exception as e:  # the TPU compiler refuses what cannot fit
        if report.out_of_memory(str(e)) is None:
            raise
        out["bytes"] = None
    out["fits"] = out["bytes"] is not None and out["bytes"] <= s.hbm_bytes
    if estimate and out["fits"]:
        try:
            est = report.time_estimate(programs.estimate(p, lambda lowered: report.cost(lowered.compile())),
                                       s.peak_flops, s.generation.hbm_bandwidth)
        except Exception as e:  # a loop-free twin can need more memory than the scanned step itself
            if report.out_of_memory(str(e)) is None:
                raise
            return out | {"est_error": "loop-free twin out of memory"}
        out |= est | {"flops": p.flops, "est_mfu": p.flops / s.chips / (est["est_seconds"] * s.peak_flops)}
    return out


def largest_batch(setup, slice_name, overrides, workdir, max_per_chip, estimate) -> dict:
    """Per-chip batch doubled from 1 while it fits; the largest fitting one (estimated), or the failing 1."""
    best, per = None, 1
    while per <= max_per_chip:
        r = measure(setup, slice_name, per, overrides, workdir, estimate=False)
        gib = "-" if r["bytes"] is None else f"{r['bytes'] / 2**30:.1f}"
        print(f"  {setup} {slice_name} per-chip {per}: {gib} GiB, fits={r['fits']}", flush=True)
        if not r["fits"]:
            break
        best, per = r, per * 2
    if best is None or not estimate:
        return best or r
    # estimated at the largest batch whose loop-free twins compile (said in the row when it is a smaller one)
    per = best["per_chip"]
    while per >= 1:
        e = measure(setup, slice_name, per, overrides, workdir, estimate)
        if "est_error" not in e:
            return best | {k: v for k, v in e.items() if k.startswith("est_") or k == "flops"} | {"est_per_chip": per}
        print(f"  {setup} {slice_name} per-chip {per}: {e['est_error']}", flush=True)
        per //= 2
    return best


def row(r: dict) -> str:
    gib = "compiler OOM" if r["bytes"] is None else f"{r['bytes'] / 2**30:.1f}"
    est = (f"{r['est_seconds']:.2f} | {100 * r['est_mfu']:.0f} %" if r.get("est_seconds") else "— | —")
    if r.get("est_per_chip", r["per_chip"]) != r["per_chip"]:
        est = est.replace(" |", f" (at per-chip {r['est_per_chip']}) |")
    return (f"| {r['setup']} | {r['slice']} | {'yes' if r['fits'] else 'no'} | {gib} | "
            f"{r['per_chip'] if r['fits'] else '—'} | {est} | {r['remat']} |")


def parse_setting(text: str) -> tuple[str, object]:
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise SystemExit(f"--set {text!r}: expected FIELD=VALUE, e.g. model.remat=full")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value  # a bare word: model.remat=full


def save(path: str, results: list) -> None:
    """After every row: a long table (hours on a small machine) keeps what it has if stopped."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--slices", default=SLICES)
    ap.add_argument("--levers", action="store_true", help="one setting at a time on the first setup and slice")
    ap.add_argument("--per-chip", type=int, default=2, help="with --levers: the per-chip batch")
    ap.add_argument("--only", default="", help="with --levers: only levers whose name holds one of these (comma list)")
    ap.add_argument("--max-per-chip", type=int, default=16)
    ap.add_argument("--no-estimate", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config setting for every cell (repeatable; VALUE a Python literal or a word)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    overrides = dict(parse_setting(s) for s in args.set)
    workdir = tempfile.mkdtemp(prefix="tpu_table_")
    results = []
    if args.levers:
        setup, slice_name = args.setups.split(",")[0], args.slices.split(",")[0]
        print(f"| lever ({setup}, {slice_name}, {args.per_chip} rows per chip) | GiB per chip | est. step s | "
              "est. MFU |\n|---|---:|---:|---:|")
        only = [w for w in args.only.split(",") if w]
        for name, lever in LEVERS:
            if only and not any(w in name for w in only):
                continue
            r = measure(setup, slice_name, args.per_chip, overrides | lever, workdir, not args.no_estimate)
            r["lever"] = name
            results.append(r)
            save(args.json, results)
            gib = "compiler OOM" if r["bytes"] is None else f"{r['bytes'] / 2**30:.1f}"
            est = f"{r['est_seconds']:.3f} | {100 * r['est_mfu']:.0f} %" if r.get("est_seconds") else "— | —"
            print(f"| {name} | {gib} | {est} |", flush=True)
    else:
        print("| setup | slice | fits | GiB per chip | largest per-chip batch | est. step s | est. MFU | remat |\n"
              "|---|---|---|---:|---:|---:|---:|---|")
        for setup in args.setups.split(","):
            for slice_name in args.slices.split(","):
                r = largest_batch(setup, slice_name, overrides, workdir, args.max_per_chip, not args.no_estimate)
                results.append(r)
                save(args.json, results)
                print(row(r), flush=True)


if __name__ == "__main__":
    main()
