"""SFT and distillation step throughput and peak memory: clinkd_jax vs transformers' PyTorch Qwen2-VL,
side by side on the same model geometry, batch and optimizer (AdamW on the LLM, vision frozen).

    python bench/train_step.py                 # both frameworks, both steps, prints a table and ratios
    python bench/train_step.py --size small    # a smaller geometry for a quick look
    python bench/train_step.py --profile /tmp/prof   # also the top ops by self time, JAX trace + torch.profiler

Each (framework, step) runs in its own process so peak RSS is its own. Tokens/s counts supervised
target tokens. On an accelerator the JAX side also prints model FLOPs utilisation (MFU).
PyTorch needs the Python 3.11 environment (torch 2.13 CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import profiling  # noqa: E402

SIZES = {  # LLM hidden/layers/heads/kv/mlp/vocab, vision depth/width/heads, batch, text length, image side (px)
    "small": dict(hidden=256, layers=4, heads=4, kv=2, mlp=688, vocab=8192, vdepth=2, vwidth=128, vheads=2, batch=2,
                  length=256, side=224),
    "medium": dict(hidden=512, layers=8, heads=8, kv=2, mlp=1376, vocab=32000, vdepth=4, vwidth=256, vheads=4, batch=2,
                   length=512, side=448),
    # accelerators: Qwen2-VL-2B widths (LLM 1536 / MLP 8960 / vocab 151936, ViT 1280 x 16 heads), fewer layers
    "large": dict(hidden=1536, layers=8, heads=12, kv=2, mlp=8960, vocab=151936, vdepth=8, vwidth=1280, vheads=16,
                  batch=8, length=1024, side=448),
}


def hf_config(s):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                         max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "mrope_section": mrope(s), "rope_theta": 1e6},
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=s["vdepth"], embed_dim=s["vwidth"], hidden_size=s["hidden"], num_heads=s["vheads"],
                           mlp_ratio=4),
        image_token_id=s["vocab"] - 6, video_token_id=s["vocab"] - 5, vision_start_token_id=s["vocab"] - 4,
        vision_end_token_id=s["vocab"] - 3, tie_word_embeddings=False,
    )


def mrope(s):
    half = s["hidden"] // s["heads"] // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def make_batch(s, seed=0):
    rng = np.random.default_rng(seed)
    g = s["side"] // 14
    n_img = (g // 2) ** 2
    b, length, vocab = s["batch"], s["length"], s["vocab"]
    ids = rng.integers(10, vocab - 10, (b, length))
    ids[:, 4] = vocab - 4
    ids[:, 5 : 5 + n_img] = vocab - 6
    ids[:, 5 + n_img] = vocab - 3
    labels = ids.copy()
    labels[:, : 6 + n_img + 8] = -100
    pixels = rng.standard_normal((b * g * g, 1176)).astype(np.float32)
    return ids, labels, pixels, np.array([[1, g, g]] * b), n_img


def flops_per_token(s):
    """Rough 6 * N (LLM parameters incl. LM head) per supervised token, for MFU."""
    h, layers, mlp, v, kv, heads = s["hidden"], s["layers"], s["mlp"], s["vocab"], s["kv"], s["heads"]
    per_layer = h * h * 2 + 2 * h * (h // heads) * kv + 3 * h * mlp
    return 6 * (layers * per_layer + h * v)


# ------------------------------------------------------------------------------------------- torch
def run_torch(s, mode, steps, warmup, profile="", args=None):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # GPU: bf16 weights and compute (the usual recipe)
    ids, labels, pixels, grid, _ = make_batch(s)
    t = lambda x: torch.from_numpy(np.asarray(x)).to(dev)
    kw = dict(input_ids=t(ids), attention_mask=torch.ones_like(t(ids)), pixel_values=t(pixels).to(dtype),
              image_grid_thw=t(grid),
              mm_token_type_ids=(t(ids) == s["vocab"] - 6).int())
    student = Qwen2VLForConditionalGeneration._from_config(hf_config(s),
                                                           attn_implementation="sdpa").to(dev, dtype).train()
    for p in student.model.visual.parameters():
        p.requires_grad_(False)
    teacher = None
    if mode == "kd":
        teacher = Qwen2VLForConditionalGeneration._from_config(hf_config(s),
                                                               attn_implementation="sdpa").to(dev, dtype).eval()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    lab = t(labels)
    base_rss = rss_mb()

    def step():
        out = student(**kw, labels=lab)
        loss = out.loss
        if teacher is not None:  # ClinKD's released KD: forward KL at T=0.5, sum over unshifted mask, (0.5 KL + CE)/1.5
            with torch.no_grad():
                t_logits = teacher(**kw).logits[..., : out.logits.shape[-1]]
            p = torch.softmax(t_logits.float() / 0.5, -1)
            logq = torch.log_softmax(out.logits.float() / 0.5, -1)
            kl = (p * (torch.log(p + 1e-30) - logq)).sum(-1)
            loss = (0.5 * (kl * (lab != -100)).sum() + out.loss) / 1.5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return float(loss)

    out = timed(step, steps, warmup, (lab[:, 1:] != -100).sum().item(), base_rss)
    if dev == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if profile:
        out["profile"] = profiling.torch_top_ops(step)
    out["device"] = dev
    return out


# --------------------------------------------------------------------------------------------- jax
def run_jax(s, mode, steps, warmup, profile="", args=None):
    import functools
    import tempfile

    import jax
    import torch  # noqa: F401  (only to build the same random checkpoint; absent -> geometry only)
    from transformers import Qwen2VLForConditionalGeneration

    from clinkd_jax.convert.hf import load_hf_checkpoint
    from clinkd_jax.data import positions
    from clinkd_jax.models import Qwen2VL
    from clinkd_jax.train import losses
    from clinkd_jax.train import state as state_lib
    from clinkd_jax.train import steps as steps_lib

    d = tempfile.mkdtemp()
    Qwen2VLForConditionalGeneration._from_config(hf_config(s)).save_pretrained(d)
    cfg, params = load_hf_checkpoint(d)
    ids, labels, pixels, grid, n_img = make_batch(s)
    pos, _ = positions.get_rope_index(ids, grid, image_token_id=cfg.image_token_id)
    n = s["side"] // 14
    per_image = [[(pixels[i * n * n : (i + 1) * n * n], tuple(grid[i]))] for i in range(s["batch"])]
    vis = positions.pack_vision_inputs(per_image, n * n)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32),
             "labels": labels.astype(np.int32), "position_ids": pos, **vis}
    on_cpu = jax.devices()[0].platform == "cpu"
    model = Qwen2VL(cfg, dtype="float32" if on_cpu else "bfloat16",  # GPU/TPU: bf16 compute, f32 master weights
                    scan_unroll=args.scan_unroll)
    tx = state_lib.optimizer_for(model, state_lib.OptimConfig(learning_rate=1e-5, grad_clip=1.0))
    state = state_lib.create(params, tx)
    teacher_params = jax.tree.map(lambda x: x.copy(), params) if mode == "kd" else None  # never the donated buffers
    kd = losses.KDConfig() if mode == "kd" else None
    fn = jax.jit(functools.partial(steps_lib.train_step, model=model, tx=tx, teacher=model if kd else None, kd=kd,
                                   chunk=args.chunk, frozen=("visual/.*",), loss_remat=args.loss_remat),
                 donate_argnums=(0,))
    compiled = fn.lower(state, teacher_params, batch).compile()
    mem = compiled.memory_analysis()
    base_rss = rss_mb()
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(holder["state"], teacher_params, batch)
        return float(m["loss"])

    out = timed(step, steps, warmup, int((labels[:, 1:] != -100).sum()), base_rss)
    if profile:
        rows, total = profiling.jax_top_ops(step, compiled.as_text(), os.path.join(profile, f"jax_{mode}"))
        out["profile"] = profiling.format_jax(rows, total)
    if mem is not None:
        out["xla_temp_mb"] = mem.temp_size_in_bytes / 2**20
    dev = jax.devices()[0]
    out["device"] = dev.device_kind
    if dev.platform != "cpu":
        out["device_peak_mb"] = (dev.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**20
        peak = {"TPU v5 lite": 197e12, "NVIDIA H100 80GB HBM3": 989e12}.get(dev.device_kind)
        if peak:
            out["mfu"] = out["tokens_per_s"] * flops_per_token(s) * (2 if kd else 1) / peak
    return out


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, steps, warmup, tokens, base_rss):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"step_s": med, "tokens_per_s": tokens / med, "peak_rss_mb": rss_mb(), "rss_before_steps_mb": base_rss}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="sft,kd")
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--profile", default="", help="a directory: also profile each step (traces kept there)")
    # clinkd_jax levers (config fields of the same names): model.scan_unroll, train.loss_chunk, train.loss_remat
    ap.add_argument("--scan-unroll", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--loss-remat", type=int, default=1, choices=(0, 1))
    ap.add_argument("--child", default="")  # internal: "<framework>:<mode>"
    args = ap.parse_args()
    s = SIZES[args.size]
    if args.child:
        framework, mode = args.child.split(":")
        out = (run_jax if framework == "jax" else run_torch)(s, mode, args.steps, args.warmup, args.profile, args)
        print("RESULT " + json.dumps(out))
        return
    print(machine.describe())
    results = {}
    for mode in args.modes.split(","):
        for framework in args.frameworks.split(","):
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", f"{framework}:{mode}"],
                                  capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(f"{framework} {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                continue
            results[(framework, mode)] = json.loads(line[0][7:])
    for (framework, mode), r in results.items():
        if "profile" in r:
            print(f"\n== profile: {framework} {mode} step ({r['device']})\n{r['profile']}")
    print(f"\nsize={args.size} {SIZES[args.size]}\nclinkd_jax: scan_unroll={args.scan_unroll} chunk={args.chunk} "
          f"loss_remat={args.loss_remat} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{'step':5} {'framework':9} {'step s':>8} {'tokens/s':>10} {'peak RSS MB':>12} {'XLA temp MB':>12}")
    for (framework, mode), r in sorted(results.items(), key=lambda kv: (kv[0][1] != "sft", kv[0][0])):
        print(f"{mode:5} {framework:9} {r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r['peak_rss_mb']:12.0f} "
              f"{r.get('xla_temp_mb', float('nan')):12.1f}" + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else "")
              + (f"  device peak {r['device_peak_mb']:.0f} MB" if "device_peak_mb" in r else ""))
    for mode in ("sft", "kd"):
        if ("jax", mode) in results and ("torch", mode) in results:
            ratio = results[("jax", mode)]["tokens_per_s"] / results[("torch", mode)]["tokens_per_s"]
            mem = results[("jax", mode)]["peak_rss_mb"] / results[("torch", mode)]["peak_rss_mb"]
            print(f"{mode}: clinkd_jax / PyTorch throughput = {ratio:.2f}x, peak RSS ratio = {mem:.2f}")


if __name__ == "__main__":
    main()
