"""Summaries over seeds: the spread table computed from several recipe workdirs."""

import json
import os

import pytest

from clinkd_jax.eval import seeds


def write_run(root, stage, vg, gc_cider):
    os.makedirs(os.path.join(root, stage), exist_ok=True)
    tasks = {"VG": {"metric": "Recall@0.5", "mean": vg},
             "GC": {"metric": "captions", "mean": {"BLEU-4": 0.1, "CIDEr": gc_cider}}}
    with open(os.path.join(root, stage, "metrics.json"), "w") as f:
        json.dump({"tasks": tasks}, f)


def test_spread_over_seeds(tmp_path, capsys):
    runs = [str(tmp_path / f"s{k}") for k in range(3)]
    for run, vg, cider in zip(runs, (0.30, 0.40, 0.20), (2.0, 4.0, 3.0)):
        write_run(run, "eval_teacher", vg, cider)
        os.makedirs(os.path.join(run, "teacher"))  # a training stage: no metrics.json, not a row
    write_run(runs[0], "eval_student", 0.1, 1.0)  # only in one run
    seeds.main([*runs, "--out", str(tmp_path / "spread.md")])
    table = open(tmp_path / "spread.md").read()
    assert table in capsys.readouterr().out
    # VG 30, 40, 20 -> mean 30, sample sd 10; CIDEr 200, 400, 300 -> 300 ± 100
    assert "| eval_teacher | 3 | 30.00 ± 10.00 (20.00–40.00) | 300.00 ± 100.00 (200.00–400.00) |" in table
    assert "| eval_student | 1 | 10.00 ± 0.00 (10.00–10.00) | 100.00 ± 0.00 (100.00–100.00) |" in table
    assert "| model | runs | VG Recall@0.5 | GC CIDEr |" in table and "\n| teacher |" not in table


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        seeds.main([str(tmp_path)])
