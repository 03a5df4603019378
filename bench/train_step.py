"""SFT and distillation step throughput and peak memory: clinkd_jax vs transformers' PyTorch Qwen2-VL (or
Qwen2.5-VL, `--family qwen2_5_vl`, or Qwen3-VL, `--family qwen3_vl`), side by side on the same model geometry,
batch and optimizer (AdamW on the LLM, vision frozen).

    python bench/train_step.py                 # both frameworks, both steps, prints a table and ratios
    python bench/train_step.py --family qwen2_5_vl   # Qwen2.5-VL's tower: window attention (112 px), gated MLP
    python bench/train_step.py --family qwen3_vl     # 16 px patches, position table, DeepStack, the Qwen3 LLM
    python bench/train_step.py --size small    # a smaller geometry for a quick look
    python bench/train_step.py --profile /tmp/prof   # also the top ops by self time, JAX trace + torch.profiler
    python bench/train_step.py --modes gkd     # on-policy distillation: generation + teacher scoring + update
    python bench/train_step.py --lora 16       # LoRA (rank 16 on the LLM's projections) vs transformers + peft

The on-policy step ("gkd"): each row's prompt (image and question; the data's answer is the row's last
`GKD_ANSWER` tokens) is answered by the student, sampled at temperature 1 for exactly --new-tokens tokens (no stop
token can be drawn), the teacher scores the answered rows and the student is updated on GKD's JSD (beta 0.5) alone.
PyTorch: transformers' `generate` with the image, then TRL's `GKDTrainer.generalized_jsd_loss` (TRL 1.16's
GKDTrainer itself cannot run this step: its generation and its forward passes give the models input ids and masks
only, no pixel values, so a VLM student and teacher would see image placeholders without the image).

--lora R: the student's LLM attention and MLP projections get rank-R adapters (alpha 2R) and only they train: ours
through qwix (clinkd_jax.models.lora, the base a frozen input of the step; `--base-quant int8|int4|nf4` reads it
quantised, QLoRA), PyTorch through peft's `get_peft_model` on the same modules (no QLoRA there: bitsandbytes has no
CPU path).

Each (framework, step) runs in its own process so peak RSS is its own. Tokens/s counts supervised
target tokens. Both sides print model TFLOP/s and, where the chip's peak is known, MFU two ways: model
FLOPs (clinkd_jax.models.flops) over every processed position, and over supervised positions only.
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
    # Qwen2-VL-2B and -7B, full depth, ClinKD's 2048-token cutoff (7b: the KD teacher of --teacher-size 7b)
    "2b": dict(hidden=1536, layers=28, heads=12, kv=2, mlp=8960, vocab=151936, vdepth=32, vwidth=1280, vheads=16,
               batch=4, length=2048, side=448),
    "7b": dict(hidden=3584, layers=28, heads=28, kv=4, mlp=18944, vocab=152064, vdepth=32, vwidth=1280, vheads=16,
               batch=4, length=2048, side=448),
}


def patch_of(family):
    return 16 if family == "qwen3_vl" else 14


def hf_config(s, family="qwen2_vl"):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    if family == "qwen3_vl":  # Qwen3-VL's tower proportions (MLP 4304 / 1152), DeepStack from 3 blocks, Qwen3 LLM
        step = max(s["vdepth"] // 4, 1)
        vision = dict(depth=s["vdepth"], hidden_size=s["vwidth"], out_hidden_size=s["hidden"], num_heads=s["vheads"],
                      intermediate_size=s["vwidth"] * 4304 // 1152, patch_size=16, num_position_embeddings=2304,
                      deepstack_visual_indexes=list(range(step - 1, s["vdepth"], step))[:3])
        text = _text(s)
        text.update(head_dim=s["hidden"] // s["heads"], attention_bias=False)
        text["rope_parameters"]["mrope_interleaved"] = True
        return Qwen3VLConfig(text_config=text, vision_config=vision, **_ids(s), tie_word_embeddings=False)
    if family == "qwen2_5_vl":  # Qwen2.5-VL's tower proportions: MLP 3420 / 1280 wide, full attention every quarter
        step = max(s["vdepth"] // 4, 2)
        vision = dict(depth=s["vdepth"], hidden_size=s["vwidth"], out_hidden_size=s["hidden"], num_heads=s["vheads"],
                      intermediate_size=s["vwidth"] * 3420 // 1280, window_size=112,
                      fullatt_block_indexes=list(range(step - 1, s["vdepth"], step)))
        return Qwen2_5_VLConfig(text_config=_text(s), vision_config=vision, **_ids(s), tie_word_embeddings=False)
    return Qwen2VLConfig(
        text_config=_text(s),
        vision_config=dict(depth=s["vdepth"], embed_dim=s["vwidth"], hidden_size=s["hidden"], num_heads=s["vheads"],
                           mlp_ratio=4),
        **_ids(s), tie_word_embeddings=False,
    )


def _ids(s):
    v = s["vocab"]
    return dict(image_token_id=v - 6, video_token_id=v - 5, vision_start_token_id=v - 4, vision_end_token_id=v - 3)


def _text(s):
    return dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "mrope_section": mrope(s), "rope_theta": 1e6},
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def mrope(s):
    half = s["hidden"] // s["heads"] // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


GKD_ANSWER = 16  # the data's answer in a "gkd" row (its prompt is the rest): on-policy steps replace it


def make_batch(s, seed=0, patch=14, mode="sft"):
    rng = np.random.default_rng(seed)
    g = s["side"] // patch
    n_img = (g // 2) ** 2
    b, length, vocab = s["batch"], s["length"], s["vocab"]
    ids = rng.integers(10, vocab - 10, (b, length))
    ids[:, 4] = vocab - 4
    ids[:, 5 : 5 + n_img] = vocab - 6
    ids[:, 5 + n_img] = vocab - 3
    labels = ids.copy()
    labels[:, : s["length"] - GKD_ANSWER if mode == "gkd" else 6 + n_img + 8] = -100
    pixels = rng.standard_normal((b * g * g, 3 * 2 * patch * patch)).astype(np.float32)
    return ids, labels, pixels, np.array([[1, g, g]] * b), n_img


def model_config(s, family="qwen2_vl"):
    from clinkd_jax.models.config import Qwen2VLConfig

    return Qwen2VLConfig.from_hf_dict(hf_config(s, family).to_dict())


def model_flops(s, mode, args):
    """(model FLOPs of one step over every processed position, the same share of them over supervised
    positions only): clinkd_jax.models.flops (causal attention, LM head at every position, the frozen vision
    tower forward only, the KD teacher forward only)."""
    from clinkd_jax.models import flops

    ids, labels, _, _, n_img = make_batch(s, patch=patch_of(args.family), mode=mode)
    cfg = model_config(s, args.family)
    teacher = model_config(SIZES[args.teacher_size or args.size], args.family) if mode != "sft" else None
    if mode == "gkd":  # generation, then a step over prompt + answer (ours pads the prompt to the row's length)
        n, prompt = args.new_tokens, s["length"] - GKD_ANSWER
        total = (flops.generate_flops(cfg, s["batch"], prompt, [4 * n_img], n)
                 + flops.train_step_flops(cfg, s["batch"], prompt + n, [4 * n_img], teacher=teacher))
        return total, total * n / (prompt + n)
    total = flops.train_step_flops(cfg, s["batch"], s["length"], [4 * n_img], teacher=teacher,
                                   adapters=args.lora > 0)
    return total, total * float((labels[:, 1:] != -100).sum()) / ids.size


def add_mfu(out, s, mode, device_kind, args):
    """Model TFLOP/s, and MFU both ways where the chip's peak is known (flops.PEAK_BF16 or --peak-tflops)."""
    from clinkd_jax.models import flops

    total, supervised = model_flops(s, mode, args)
    out["model_tflops"] = total / out["step_s"] / 1e12
    peak = args.peak_tflops * 1e12 or flops.PEAK_BF16.get(device_kind)
    if peak:
        out["mfu"] = total / out["step_s"] / peak
        out["mfu_supervised"] = supervised / out["step_s"] / peak


# ------------------------------------------------------------------------------------------- torch
def run_torch(s, mode, steps, warmup, profile="", args=None):
    import torch
    import transformers

    torch.manual_seed(0)
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}.get(args.family,
                                                                         transformers.Qwen2VLForConditionalGeneration)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # GPU: bf16 weights and compute (the usual recipe)
    ids, labels, pixels, grid, _ = make_batch(s, patch=patch_of(args.family), mode=mode)
    t = lambda x: torch.from_numpy(np.asarray(x)).to(dev)
    kw = dict(input_ids=t(ids), attention_mask=torch.ones_like(t(ids)), pixel_values=t(pixels).to(dtype),
              image_grid_thw=t(grid),
              mm_token_type_ids=(t(ids) == s["vocab"] - 6).int())
    student = cls._from_config(hf_config(s, args.family), attn_implementation="sdpa").to(dev, dtype).train()
    for p in student.model.visual.parameters():
        p.requires_grad_(False)
    if args.lora:  # adapters on the LLM's projections (the same layers as ours); peft freezes everything else
        import peft

        student = peft.get_peft_model(student, peft.LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    teacher = None
    if mode != "sft":
        teacher = cls._from_config(hf_config(SIZES[args.teacher_size or args.size], args.family),
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

    tokens = (lab[:, 1:] != -100).sum().item()
    if mode == "gkd":
        step, tokens = _torch_gkd_step(s, args, student, teacher, opt, kw), s["batch"] * args.new_tokens
    out = timed(step, steps, warmup, tokens, base_rss)
    out["trained_params"] = sum(p.numel() for group in opt.param_groups for p in group["params"])
    if dev == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    add_mfu(out, s, mode, torch.cuda.get_device_name() if dev == "cuda" else "cpu", args)
    if profile:
        out["profile"] = profiling.torch_top_ops(step)
    out["device"] = dev
    return out


def _torch_gkd_step(s, args, student, teacher, opt, kw):
    """The on-policy step in PyTorch: transformers' generate with the image, TRL's GKD loss on the answers."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    prompt = s["length"] - GKD_ANSWER
    n = args.new_tokens
    image = {k: kw[k] for k in ("pixel_values", "image_grid_thw")}

    def step():
        with torch.no_grad():
            cut = {k: kw[k][:, :prompt] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            seq = student.generate(**cut, **image,
                                   max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_p=1.0,
                                   top_k=0, eos_token_id=None, pad_token_id=0)
        labels = seq.clone()
        labels[:, :prompt] = -100
        full = dict(input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=(seq == s["vocab"] - 6).int(),
                    **image)
        logits = student(**full).logits
        with torch.no_grad():
            t_logits = teacher(**full).logits[..., : logits.shape[-1]]
        loss = GKDTrainer.generalized_jsd_loss(logits[:, :-1], t_logits[:, :-1], labels[:, 1:], beta=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return float(loss)

    return step


# --------------------------------------------------------------------------------------------- jax
def run_jax(s, mode, steps, warmup, profile="", args=None):
    import functools

    import jax

    from clinkd_jax.data import positions
    from clinkd_jax.models import Qwen2VL
    from clinkd_jax.models.qwen2vl import init_params
    from clinkd_jax.train import losses
    from clinkd_jax.train import state as state_lib
    from clinkd_jax.train import steps as steps_lib

    cfg = model_config(s, args.family)  # random weights, drawn on the device: speed does not depend on their values
    ids, labels, pixels, grid, n_img = make_batch(s, patch=patch_of(args.family), mode=mode)
    pos, _ = positions.get_rope_index(ids, grid, image_token_id=cfg.image_token_id)
    n = s["side"] // patch_of(args.family)
    per_image = [[(pixels[i * n * n : (i + 1) * n * n], tuple(grid[i]))] for i in range(s["batch"])]
    vis = positions.pack_vision_inputs(per_image, n * n)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32),
             "labels": labels.astype(np.int32), "position_ids": pos, **vis}
    on_cpu = jax.devices()[0].platform == "cpu"
    compute = "float32" if on_cpu else "bfloat16"  # GPU/TPU: bf16 compute, f32 master weights
    kw = dict(dtype=compute, scan_unroll=args.scan_unroll, attention_impl=args.attention,
              attention_loop=args.attention_loop, vision_query_block=args.vision_query_block)
    model = Qwen2VL(cfg, remat=args.remat, **kw)
    tx = state_lib.optimizer(state_lib.OptimConfig(learning_rate=1e-5, grad_clip=1.0,
                                                              mu_dtype=args.mu_dtype))
    trained, base = init_params(model, jax.random.key(0)), ()
    if args.lora:  # the adapters train; the base (quantised with --base-quant) is the step's last argument
        from clinkd_jax.models import lora as lora_lib
        from clinkd_jax.models import quant

        lora = lora_lib.LoraConfig(args.lora, 2.0 * args.lora, base_quant=args.base_quant)
        q = quant.plan(model, lora.base_quant, lora_lib.quantised_layers(lora))
        base = (jax.jit(q.quantize)(trained) if q else trained,)
        trained = lora_lib.init_adapters(lora_lib.adapted(model, lora), jax.random.key(2), None)
        model = lora_lib.adapted(model, lora, training=True)
    trained_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained)
    state = jax.jit(functools.partial(state_lib.create, tx=tx), donate_argnums=0)(trained)
    teacher = teacher_params = kd = None
    if mode != "sft":  # the teacher's weights in the compute dtype, as a published checkpoint loads
        t_cfg = model_config(SIZES[args.teacher_size or args.size], args.family)
        teacher = Qwen2VL(t_cfg, param_dtype=compute, **kw)
        teacher_params = init_params(teacher, jax.random.key(1))
        kd = losses.KDConfig()
    source = None if teacher is None else steps_lib.TeacherSource("online", teacher)
    loss = steps_lib.LossSettings(kd=kd, chunk=args.chunk, backward=args.loss_backward)
    step_fn, tokens = steps_lib.train_step, int((labels[:, 1:] != -100).sum())
    if mode == "gkd":  # the student's answers, exactly --new-tokens each (no stop id can be sampled), GKD's JSD
        from clinkd_jax.infer.generate import SamplingConfig
        from clinkd_jax.train import on_policy

        sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=(s["vocab"],),
                                  pad_token_id=0)
        step_fn = functools.partial(on_policy.sampled_step, sampler=on_policy.Sampler("student", sampling, 0))
        loss = steps_lib.LossSettings(kd=losses.KDConfig(divergence="jsd", jsd_beta=0.5, temperature=1.0,
                                                         use_ce=False, mask="aligned"),
                                      chunk=args.chunk, backward=args.loss_backward)
        batch["record_index"], tokens = np.arange(s["batch"], dtype=np.int32), s["batch"] * args.new_tokens
    fn = jax.jit(functools.partial(step_fn, model=model, tx=tx, loss=loss, teacher=source, frozen=("visual/.*",)),
                 donate_argnums=(0,))
    compiled = fn.lower(state, teacher_params, batch, *base).compile()
    mem = compiled.memory_analysis()
    base_rss = rss_mb()
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(holder["state"], teacher_params, batch, *base)
        return float(m["loss"])

    out = timed(step, steps, warmup, tokens, base_rss)
    out["trained_params"] = sum(x.size for x in jax.tree.leaves(trained_shapes))
    if profile:
        rows, total = profiling.jax_top_ops(step, compiled.as_text(), os.path.join(profile, f"jax_{mode}"))
        out["profile"] = profiling.format_jax(rows, total)
    if mem is not None:
        out["xla_temp_mb"] = mem.temp_size_in_bytes / 2**20
    dev = jax.devices()[0]
    out["device"] = dev.device_kind
    if dev.platform != "cpu":
        out["device_peak_mb"] = (dev.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**20
    add_mfu(out, s, mode, dev.device_kind, args)
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
    ap.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="sft,kd")
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--profile", default="", help="a directory: also profile each step (traces kept there)")
    # clinkd_jax levers (config fields of the same names): runtime.scan_unroll, train.loss_chunk, train.loss_backward
    ap.add_argument("--scan-unroll", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--loss-backward", default="fused", choices=("fused", "autodiff"))
    ap.add_argument("--remat", default="none", help="model.remat: none | minimal | minimal_with_context | "
                    "dots_saveable | full")
    ap.add_argument("--attention", default="xla", help="model.attention: xla | jax | cudnn (GPU) | splash (TPU)")
    ap.add_argument("--attention-loop", default="auto",
                    help="runtime.attention_loop: auto (per_head on CPU) | per_head | batched")
    ap.add_argument("--vision-query-block", type=int, default=0,
                    help="runtime.vision_query_block: 0 all rows | rows per block")
    ap.add_argument("--mu-dtype", default="", help="optim.mu_dtype: '' (float32) | bfloat16")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (0: the size's own)")
    ap.add_argument("--new-tokens", type=int, default=32, help="gkd: tokens each answer is sampled to")
    ap.add_argument("--teacher-size", default="", choices=["", *sorted(SIZES)], help="KD teacher ('': --size)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on the student's LLM projections (0: full)")
    ap.add_argument("--base-quant", default="", choices=("", "int8", "int4", "nf4"), help="with --lora: QLoRA's base")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the chip's peak, where flops.PEAK_BF16 lacks it")
    machine.add_malloc_flag(ap)
    ap.add_argument("--child", default="")  # internal: "<framework>:<mode>"
    args = ap.parse_args()
    s = dict(SIZES[args.size], **({"batch": args.batch} if args.batch else {}))
    if args.child:
        framework, mode = args.child.split(":")
        out = (run_jax if framework == "jax" else run_torch)(s, mode, args.steps, args.warmup, args.profile, args)
        print("RESULT " + json.dumps(out))
        return
    machine.set_malloc_hugepages(args.malloc_hugepages)
    print(machine.describe())  # the children (both frameworks) start with this environment
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
    print(f"\nfamily={args.family} size={args.size} {s}"
          + (f" teacher={args.teacher_size}" if args.teacher_size else "")
          + f"\nclinkd_jax: scan_unroll={args.scan_unroll} chunk={args.chunk} loss_backward={args.loss_backward} "
          f"remat={args.remat} attention={args.attention} attention_loop={args.attention_loop} "
          f"vision_query_block={args.vision_query_block} "
          f"mu_dtype={args.mu_dtype or 'float32'} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.lora:
        trained = {f: r["trained_params"] for (f, _), r in results.items()}
        print(f"LoRA rank {args.lora} (alpha {2 * args.lora}) on the LLM's projections; clinkd_jax's base: "
              f"{args.base_quant or 'float32'}, PyTorch's: float32 (peft); parameters trained: {trained}")
    if "gkd" in args.modes:
        print(f"gkd: {args.new_tokens} sampled tokens per row, trained on alone (tokens/s counts them)")
    print(f"{'step':5} {'framework':9} {'step s':>8} {'tokens/s':>10} {'peak RSS MB':>12} {'XLA temp MB':>12} "
          f"{'model TFLOP/s':>14}")
    for (framework, mode), r in sorted(results.items(), key=lambda kv: (kv[0][1] != "sft", kv[0][0])):
        print(f"{mode:5} {framework:9} {r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r['peak_rss_mb']:12.0f} "
              f"{r.get('xla_temp_mb', float('nan')):12.1f} {r['model_tflops']:14.3f}"
              + (f"  MFU {r['mfu']:.1%} (supervised positions only: {r['mfu_supervised']:.1%})" if "mfu" in r else "")
              + (f"  device peak {r['device_peak_mb']:.0f} MB" if "device_peak_mb" in r else ""))
    for mode in ("sft", "kd", "gkd"):
        if ("jax", mode) in results and ("torch", mode) in results:
            ratio = results[("jax", mode)]["tokens_per_s"] / results[("torch", mode)]["tokens_per_s"]
            mem = results[("jax", mode)]["peak_rss_mb"] / results[("torch", mode)]["peak_rss_mb"]
            print(f"{mode}: clinkd_jax / PyTorch throughput = {ratio:.2f}x, peak RSS ratio = {mem:.2f}")


if __name__ == "__main__":
    main()
