"""The same recipe run with several seeds, summarised: every evaluation stage's headline means (×100) as
mean ± standard deviation and the range over the runs, so a reader sees which differences exceed the
seed-to-seed spread.

    python -m clinkd_jax.eval.seeds /tmp/demo_s0 /tmp/demo_s1 /tmp/demo_s2 [--out spread.md]

Each argument is a recipe workdir (`--workdir` of `python -m clinkd_jax.main`); its evaluation stages are
the sub-folders holding a metrics.json. Stages missing from some runs are summarised over the runs that
have them (the count is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from clinkd_jax import cli, files
from clinkd_jax.errors import UserError, one_line
from clinkd_jax.eval.report import TASK_NAMES, headline, mean_value


def collect(workdirs) -> dict[str, dict[str, list[float]]]:
    """{evaluation stage: {"<task> <metric>": [value per run]}} (×1) over the workdirs."""
    out: dict[str, dict[str, list[float]]] = {}
    for w in workdirs:
        for name in sorted(os.listdir(w)):
            path = os.path.join(w, name, "metrics.json")
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    tasks = json.load(f)["tasks"]
            except (ValueError, KeyError, TypeError) as e:  # torn: that evaluation's own rerun writes it again
                print(f"warning: {path} is unreadable ({type(e).__name__}); left out", file=sys.stderr)
                continue
            for task in (t for t in TASK_NAMES if t in tasks):
                value = mean_value(task, tasks[task]["mean"])
                if value is not None:
                    out.setdefault(name, {}).setdefault(f"{task} {headline(task, tasks[task])}", []).append(value)
    return out


def spread_table(values: dict[str, dict[str, list[float]]]) -> str:
    cols = list(dict.fromkeys(c for per in values.values() for c in per))
    lines = ["| model | runs | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, per in values.items():
        runs = max(len(v) for v in per.values())
        cells = []
        for col in cols:
            v = [100 * x for x in per.get(col, [])]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append("–" if not v else f"{statistics.mean(v):.2f} ± {sd:.2f} ({min(v):.2f}–{max(v):.2f})")
        lines.append(f"| {name} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args(argv)
    missing = [w for w in args.workdirs if not os.path.isdir(w)]
    if missing:
        p.error(f"not a directory: {', '.join(missing)}")
    if args.out:
        try:
            cli.writable(args.out, "out")
        except UserError as e:
            p.error(str(e))
    values = collect(args.workdirs)
    if not values:
        p.error("no evaluation results (<workdir>/<stage>/metrics.json) in " + ", ".join(args.workdirs))
    table = (f"Mean ± standard deviation (min–max) over {len(args.workdirs)} runs, ×100, 8-modality means:\n\n"
             + spread_table(values))
    print(table)
    if args.out:
        try:
            files.write_text(args.out, table)
        except files.DiskFull as e:
            cli.fail(one_line(e))


if __name__ == "__main__":
    main()
