"""Generation speed: clinkd_jax's jitted prefill + while-loop decode vs transformers' `generate`, side by
side on the same random checkpoint, prompts and image, greedy, no early stop.

    python bench/decode.py                      # medium geometry, batch 4, 128 new tokens
    python bench/decode.py --size small --new 32
    python bench/decode.py --profile /tmp/prof  # also the top ops by self time of one whole generate call

Time to first token (TTFT) = a whole generate call with max_new_tokens=1 (vision + prefill + one token).
Decode tokens/s = batch * (N - 1) / (t(N) - t(1)): the per-token loop alone. Each framework runs in its
own process after a warm-up (JAX: compiled once per shape). On a GPU both sides run bfloat16 (PyTorch
with SDPA attention on CUDA), on a CPU float32. PyTorch needs the Python 3.11 environment here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import profiling  # noqa: E402
from train_step import SIZES, hf_config  # noqa: E402  (same geometries as the train-step benchmark)


def prompts(s, batch, length, seed=0):
    """(ids (B, L) with one image each, pixels (B*g*g, 1176), grids) — all rows the same length."""
    rng = np.random.default_rng(seed)
    g = s["side"] // 14
    n_img = (g // 2) ** 2
    vocab = s["vocab"]
    ids = rng.integers(10, vocab - 10, (batch, length))
    ids[:, 4] = vocab - 4
    ids[:, 5 : 5 + n_img] = vocab - 6
    ids[:, 5 + n_img] = vocab - 3
    pixels = rng.standard_normal((batch * g * g, 1176)).astype(np.float32)
    return ids, pixels, np.array([[1, g, g]] * batch)


def checkpoint_dir(s):
    """A random transformers checkpoint, written once per geometry so both processes load the same weights."""
    import tempfile

    d = os.path.join(tempfile.gettempdir(), f"clinkd_bench_decode_{s['hidden']}_{s['layers']}_{s['vocab']}")
    if not os.path.isfile(os.path.join(d, "config.json")):
        import torch
        from transformers import Qwen2VLForConditionalGeneration

        torch.manual_seed(0)
        Qwen2VLForConditionalGeneration._from_config(hf_config(s)).save_pretrained(d)
    return d


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_torch(s, args, ckpt):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
    model = model.to(dev).eval()
    ids, pixels, grid = prompts(s, args.batch, args.prompt)
    t = lambda x: torch.from_numpy(np.asarray(x)).to(dev)
    kw = dict(input_ids=t(ids), attention_mask=torch.ones_like(t(ids)), pixel_values=t(pixels).to(dtype),
              image_grid_thw=t(grid), mm_token_type_ids=(t(ids) == s["vocab"] - 6).int(), do_sample=False, num_beams=1,
              pad_token_id=0)

    def gen(n):
        with torch.no_grad():
            try:
                out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
            except ValueError as e:  # transformers before 5.2x has no mm_token_type_ids argument
                if "mm_token_type_ids" not in str(e):
                    raise
                kw.pop("mm_token_type_ids")
                out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        if dev == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt + n
        return out

    for n in (1, args.new):
        gen(n)  # warm-up
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else float("nan")
    out = {"t1": median_time(lambda: gen(1), args.repeats), "tN": median_time(lambda: gen(args.new), args.repeats),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "peak_mem_mb": mem}
    if args.profile:
        out["profile"] = profiling.torch_top_ops(lambda: gen(args.new), calls=1)
    return out


def run_jax(s, args, ckpt):
    import jax

    from clinkd_jax import sharding
    from clinkd_jax.data import positions
    from clinkd_jax.hf_checkpoint import load_hf_checkpoint
    from clinkd_jax.infer import generate as G
    from clinkd_jax.models import Qwen2VL

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = "float32" if on_cpu else "bfloat16"
    cfg, params = load_hf_checkpoint(ckpt, dtype=dtype)
    ids, pixels, grid = prompts(s, args.batch, args.prompt)
    pos, deltas = positions.get_rope_index(ids, grid, image_token_id=cfg.image_token_id)
    n = int(np.prod(grid[0]))
    vis = positions.pack_vision_inputs([[(pixels[i * n:(i + 1) * n], tuple(grid[i]))] for i in range(args.batch)], n)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32), "position_ids": pos,
             "decode_offsets": deltas, **vis}
    model = Qwen2VL(cfg, dtype=dtype, attention_impl=args.attention, scan_unroll=args.scan_unroll,
                    attention_loop=args.attention_loop, vision_query_block=args.vision_query_block,
                    decode_layers=args.decode_layers)
    gen = G.Generator(model, params)

    def run(k):
        out = gen(batch, G.SamplingConfig(max_new_tokens=k, stop_token_ids=(-1,), pad_token_id=0))  # never stops
        assert out.shape == (args.batch, k)
        return out

    for k in (1, args.new):
        run(k)  # compile + warm-up
    stats = jax.devices()[0].memory_stats() or {}
    out = {"t1": median_time(lambda: run(1), args.repeats), "tN": median_time(lambda: run(args.new), args.repeats),
           "device": jax.devices()[0].device_kind, "peak_mem_mb": stats.get("peak_bytes_in_use", float("nan")) / 2**20}
    if args.profile:  # one whole call: vision + prefill + the decode loop
        sampling = G.SamplingConfig(max_new_tokens=args.new, stop_token_ids=(-1,), pad_token_id=0)
        with sharding.use_mesh(gen.mesh, gen.rules):
            text = gen._fn(sampling).lower(gen.params, gen._place(batch), jax.random.key(0)).compile().as_text()
        rows, total = profiling.jax_top_ops(lambda: run(args.new), text, os.path.join(args.profile, "jax_generate"),
                                            calls=1)
        out["profile"] = profiling.format_jax(rows, total)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=384, help="prompt tokens incl. the image's")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="xla", help="clinkd_jax attention implementation")
    ap.add_argument("--scan-unroll", type=int, default=1, help="clinkd_jax runtime.scan_unroll")
    ap.add_argument("--attention-loop", default="auto", help="clinkd_jax runtime.attention_loop: "
                    "auto (per_head on CPU) | per_head | batched")
    ap.add_argument("--vision-query-block", type=int, default=0,
                    help="clinkd_jax runtime.vision_query_block: 0 all rows | rows per block")
    ap.add_argument("--decode-layers", default="auto", help="clinkd_jax runtime.decode_layers: "
                    "auto (unrolled on CPU) | unrolled | scan")
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--profile", default="", help="a directory: also profile one generate call (traces kept there)")
    machine.add_malloc_flag(ap)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    s = SIZES[args.size]
    ckpt = checkpoint_dir(s)
    if args.child:
        out = (run_jax if args.child == "jax" else run_torch)(s, args, ckpt)
        print("RESULT " + json.dumps(out))
        return
    machine.set_malloc_hugepages(args.malloc_hugepages)
    print(machine.describe())  # the children (both frameworks) start with this environment
    results = {}
    for fw in args.frameworks.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", fw]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{fw} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            continue
        r = json.loads(line[0][7:])
        r["ttft_ms"] = 1000 * r["t1"]
        r["decode_tok_s"] = args.batch * (args.new - 1) / max(r["tN"] - r["t1"], 1e-9)
        results[fw] = r
    for fw, r in results.items():
        if "profile" in r:
            print(f"\n== profile: {fw}, one generate call of {args.new} tokens ({r['device']})\n{r['profile']}")
    print(f"\nsize={args.size} batch={args.batch} prompt={args.prompt} new={args.new} {s}")
    print(f"clinkd_jax: attention={args.attention} scan_unroll={args.scan_unroll} attention_loop="
          f"{args.attention_loop} vision_query_block={args.vision_query_block} decode_layers={args.decode_layers} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{'framework':10} {'device':24} {'TTFT ms':>9} {'decode tok/s':>13} {'total s':>8} {'peak MB':>9}")
    for fw, r in results.items():
        print(f"{fw:10} {r['device'][:24]:24} {r['ttft_ms']:9.1f} {r['decode_tok_s']:13.1f} {r['tN']:8.3f} "
              f"{r['peak_mem_mb']:9.0f}")
    if len(results) == 2:
        j, t = results["jax"], results["torch"]
        decode = f"decode throughput {j['decode_tok_s'] / t['decode_tok_s']:.2f}x, " if args.new > 1 else ""
        print(f"clinkd_jax / transformers: {decode}TTFT {t['ttft_ms'] / j['ttft_ms']:.2f}x faster, "
              f"whole generate call {t['tN'] / j['tN']:.2f}x faster")


if __name__ == "__main__":
    main()
