"""Convert between a Hugging Face Qwen2-VL directory and a clinkd_jax (Orbax) params checkpoint.

    python -m clinkd_jax.convert hf-to-orbax  --src Qwen2-VL-7B-Instruct/ --dst ckpt/qwen2vl7b [--dtype bfloat16]
    python -m clinkd_jax.convert orbax-to-hf  --src ckpt/qwen2vl7b --dst exported/ [--dtype bfloat16]

Tokenizer, chat template and processor files travel along in both directions (kept under
`hf_assets/` in the Orbax directory), so the exported directory loads with transformers and serves
with the usual tools. Runs on whatever devices JAX sees; `--mesh` shards the params while converting
(e.g. `--mesh=1,-1,1` spreads a 72B model over all local devices with FSDP).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from clinkd_jax import checkpoint, cli, files, hf_checkpoint, sharding
from clinkd_jax.errors import UserError, one_line
from clinkd_jax.model_source import ModelSource

DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every command's config errors (clinkd_jax.cli)
        cli.fail(f"config error: {message} (python -m clinkd_jax.convert --help)")


def parse_args(argv):
    p = _Parser(prog="python -m clinkd_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("direction", choices=("hf-to-orbax", "orbax-to-hf"))
    p.add_argument("--src", required=True, help="source directory")
    p.add_argument("--dst", required=True, help="destination directory (created)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast every parameter (default: keep stored dtype)")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape for the conversion (-1 = rest)")
    p.add_argument("--max_shard_gb", type=float, default=4.0, help="safetensors shard size when writing HF")
    p.add_argument("--verbose", action="store_true", help="on a config error, show the traceback as well")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Every argument checked before anything is read or written, one line each."""
    if not os.path.isdir(args.src):
        raise UserError(f"--src {args.src} is not a directory")
    wanted = "config.json" if args.direction == "hf-to-orbax" else checkpoint.CONFIG_FILE
    if not os.path.isfile(os.path.join(args.src, wanted)):
        raise UserError(f"--src {args.src} has no {wanted}: not a " + (
            "Hugging Face model directory" if args.direction == "hf-to-orbax" else "clinkd_jax params directory"))
    src, dst = os.path.realpath(args.src), os.path.realpath(args.dst)
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise UserError(f"--dst {args.dst} overlaps --src {args.src}: writing it would overwrite what is read")
    cli.writable(args.dst, "dst", folder=True)
    if not args.max_shard_gb > 0:
        raise UserError(f"--max_shard_gb {args.max_shard_gb:g}: must be positive")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
    except UserError as e:
        if args.verbose:
            raise
        cli.fail(one_line(e))
    try:
        mesh = sharding.make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    except ValueError as e:
        cli.fail(f"config error: --mesh={args.mesh}: {e}")
    start = time.time()
    source = ModelSource("model", "hf_dir" if args.direction == "hf-to-orbax" else "orbax_dir", args.src)
    try:
        cfg, params = source.load(mesh, sharding.DEFAULT_RULES, seed=0, dtype=args.dtype)
        if args.direction == "hf-to-orbax":
            checkpoint.save_params(args.dst, params, cfg)
            copied = hf_checkpoint.copy_assets(source.assets, os.path.join(args.dst, checkpoint.ASSETS_DIR))
        else:
            copied = hf_checkpoint.save_hf_checkpoint(
                params, cfg, args.dst, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                assets_from=source.assets if os.path.isdir(source.assets) else None,
            )
    except (UserError, FileNotFoundError) as e:
        if args.verbose:
            raise
        cli.fail(one_line(e) if isinstance(e, UserError) else f"config error: {e}")
    except Exception as e:  # a full disk met by Orbax's writer
        if args.verbose or not files.is_disk_full(e):
            raise
        cli.fail(one_line(files.disk_full(args.dst)))
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.direction}: {n / 1e6:.1f}M parameters -> {args.dst} in {time.time() - start:.1f}s"
          f" (assets: {', '.join(copied) or 'none'})")
    return 0


def run():  # console script entry point
    sys.exit(main())


if __name__ == "__main__":
    run()
