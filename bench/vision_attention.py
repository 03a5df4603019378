"""The vision tower's attention alone: clinkd_jax's `xla` attention (each `runtime.attention_loop` /
`runtime.vision_query_block` setting) vs PyTorch's `scaled_dot_product_attention`, same shapes, float32.

    python bench/vision_attention.py                 # medium geometry: 4 images x 1024 patches, 4 x 64 heads
    python bench/vision_attention.py --grad          # also forward + backward (training)
    python bench/vision_attention.py --heads 16      # Qwen2-VL's ViT: 16 heads of 80

The op a prefill runs `depth` times; on a 2-core CPU it was the part of the time to first token furthest from
the GEMM rate (bench/history.md). Each variant is timed alternately with the others, the median of the
repeats; every variant's output is checked against the batched one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # noqa: E402

VARIANTS = {"batched": (False, 0), "batched, 256-row blocks": (False, 256), "per_head": (True, 0),
            "per_head, 256-row blocks": (True, 256)}


def jax_fns(q, k, v, segments, grad):
    import jax
    import jax.numpy as jnp

    from clinkd_jax.models import attention

    # the mask is an argument, as in the model (a constant one would be folded away by XLA)
    args = [jnp.asarray(x) for x in (q, k, v)] + [attention.segment_mask(jnp.asarray(segments), jnp.asarray(segments))]
    fns = {}
    for name, (per_head, block) in VARIANTS.items():
        def attend(q, k, v, mask, per_head=per_head, block=block):
            return attention.dot_product_attention(q, k, v, mask, per_head=per_head, query_block=block)

        fwd = jax.jit(attend)
        step = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2))) if grad else None
        fns[f"jax {name}"] = (lambda f=fwd: f(*args).block_until_ready(),
                              step and (lambda s=step: jax.block_until_ready(s(*args))), lambda f=fwd: f(*args))
    return fns


def torch_fns(q, k, v, segments, grad):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(machine.cores())
    t = [torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_(grad) for x in (q, k, v)]  # (B, N, T, H)
    mask = torch.from_numpy(segments[:, None, :, None] == segments[:, None, None, :])  # (B, 1, T, S)
    full = bool(mask.all())  # one image per row: no mask, SDPA's fastest path

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*t, attn_mask=None if full else mask).transpose(1, 2)

    def step():
        (F.scaled_dot_product_attention(*t, attn_mask=None if full else mask) ** 2).sum().backward()

    return {"torch sdpa" + ("" if full else " (mask)"): (fwd, step if grad else None, lambda: fwd().numpy())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4, help="rows, one image each")
    ap.add_argument("--patches", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--grad", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--frameworks", default="torch,jax")
    args = ap.parse_args()
    print(machine.describe())
    rng = np.random.default_rng(0)
    shape = (args.images, args.patches, args.heads, args.head_dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    segments = np.ones((args.images, args.patches), np.int32)
    fns = {}
    for fw in args.frameworks.split(","):
        fns.update((jax_fns if fw == "jax" else torch_fns)(q, k, v, segments, args.grad))
    ref = None
    for name, (_, _, out) in fns.items():  # compile, warm up, check
        o = np.asarray(out())
        ref = o if ref is None else ref
        np.testing.assert_allclose(o, ref, atol=1e-4, err_msg=name)
    times = {name: ([], []) for name in fns}
    for _ in range(args.repeats):  # alternating, so a slow phase of the machine hits every variant
        for name, (fwd, step, _) in fns.items():
            for lst, fn in zip(times[name], (fwd, step)):
                if fn is not None:
                    t0 = time.perf_counter()
                    fn()
                    lst.append(time.perf_counter() - t0)
    flops = 4 * args.images * args.heads * args.patches**2 * args.head_dim
    print(f"\n{args.images} images x {args.patches} patches, {args.heads} heads x {args.head_dim}; "
          f"{flops / 1e9:.1f} GFLOP forward")
    print(f"{'variant':34} {'fwd ms':>8} {'GFLOP/s':>8}" + (f" {'fwd+bwd ms':>11}" if args.grad else ""))
    med = {name: [np.median(x) * 1e3 if x else float("nan") for x in ts] for name, ts in times.items()}
    for name, (f, b) in med.items():
        print(f"{name:34} {f:8.1f} {flops / f / 1e6:8.1f}" + (f" {b:11.1f}" if args.grad else ""))
    base = [m for n, m in med.items() if n.startswith("torch")]
    for name, (f, b) in med.items():
        if base and name.startswith("jax"):
            print(f"{name} / torch: forward {base[0][0] / f:.2f}x" + (f", fwd+bwd {base[0][1] / b:.2f}x" if args.grad
                                                                        else ""))


if __name__ == "__main__":
    main()
