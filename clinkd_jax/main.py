"""clinkd_jax entry point.

    python -m clinkd_jax.main --config=configs/demo_train.py --workdir=/tmp/run [--config.a.b=value ...]

The config names the stage (`sft`, `kd`, `rct` or `eval`), or several `stages` (clinkd_jax.recipe), and
every knob of the paper (configs/base.py). Unknown or inconsistent settings fail before anything is
compiled, naming the field, in one line (`config error: ...`; `--verbose` adds the traceback).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from clinkd_jax import cli, distributed, recipe  # import jax, touch no device (jax.distributed starts in main)
from clinkd_jax.data.records import skip_summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<x>.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and outputs go")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.INFO)  # clinkd_jax's own progress messages
    for noisy in ("absl", "jax", "orbax"):  # Orbax and Grain (through absl) log every save and read at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    distributed.initialize_from_flags()
    logging.getLogger("clinkd_jax").info("running on %s", distributed.describe())
    c = _CONFIG.value
    distributed.set_stage("recipe" if c.stages else c.stage)  # a recipe names each of its stages
    if _WORKDIR.value.startswith("gs://"):
        print("config error: --workdir is a gs:// URL; mount the bucket with gcsfuse on every host (launch/tpu.sh "
              "does) and pass the mount path, with --config.checkpoint.commit_files=True", file=sys.stderr)
        sys.exit(2)
    with distributed.fail_fast():  # a config or data error ends every host with one line (clinkd_jax.cli)
        summary = recipe.run(c, _WORKDIR.value) if c.stages else recipe.run_stage(c, _WORKDIR.value)
    if summary["stage"] == "recipe":
        print(recipe.summary_table(summary["stages"]))
        if summary.get("evals"):
            print(recipe.comparison(summary["evals"]))
        print(("all stages done" if summary["complete"] else "interrupted: run again to resume")
              + f"; outputs in {summary['workdir']}")
        return
    if summary["stage"] == "eval":
        results = os.path.join(summary["workdir"], "results.md")
        if os.path.isfile(results):  # written by process 0
            with open(results) as f:
                print(f.read())
        print(f"{skip_summary(summary['skipped'])}; outputs in {summary['workdir']}")
        return
    if summary["stage"] == "rct":
        print(f"rct: {summary['final']}; corrected answers in {summary['corrected_file']}")
        return
    final = summary["final"]
    print(f"{summary['stage']}: {summary['steps']} steps, final loss {final.get('loss', float('nan')):.4f}"
          + (f" (ce {final['loss_ce']:.4f}, kd {final['loss_kd']:.4f})" if "loss_kd" in final else "")
          + f"; {skip_summary(summary['skipped'])}; outputs in {summary['workdir']}")


if __name__ == "__main__":
    cli.run(main)
