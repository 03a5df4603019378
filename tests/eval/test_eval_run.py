"""The evaluation run end to end on the bundled demo test files: predictions, metrics, tables, charts,
gallery; resume without recomputing; score-only on existing files; SASG mode; bad input."""

import json
import os
import sys

import pytest
import reference as R

from clinkd_jax.data import demo
from clinkd_jax.eval import answers, metrics
from clinkd_jax.eval import run as eval_run
from clinkd_jax.train.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import demo_eval  # noqa: E402

pytestmark = pytest.mark.e2e  # run under one Python only: tests/run_all.sh says why

SMALL = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
LIMIT = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    demo.generate(root, train_per_image=1, test_per_image=1, max_side=112)
    return root


def config(data_dir, **changes):
    c = demo_eval.get_config()
    c.model.text_overrides = SMALL
    c.eval.data_dir = data_dir
    c.eval.image_dir = os.path.join(data_dir, "images")
    c.eval.limit = LIMIT
    c.eval.max_new_tokens = c.eval.max_new_tokens_mii = 12
    c.eval.batch_size = 4
    c.eval.patch_buckets = (64,)
    c.eval.max_pixels = 112 * 112
    c.eval.min_pixels = 56 * 56
    c.train.progress = False
    return R.override(c, changes)


def lines(path):
    return [json.loads(x) for x in open(path)]


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval"))
    return workdir, eval_run.run(config(data_dir), workdir)


def test_end_to_end_outputs(first_run, data_dir):
    workdir, summary = first_run
    assert set(summary["tasks"]) == {"VG", "RO", "GC", "MII"}
    assert summary["generated"] == {t: LIMIT for t in ("VG", "RO", "GC", "MII")}
    source = json.load(open(os.path.join(data_dir, "Test_VG.json")))
    preds = lines(os.path.join(workdir, "predictions", "Test_VG.jsonl"))
    assert sorted(p["id"] for p in preds) == list(range(LIMIT))
    for p in preds:  # the BiRD/ClinKD prediction format, fields taken from the test file
        assert set(p) == {"id", "image", "question", "annotation", "response"}
        assert p["image"] == source[p["id"]]["id"] + ".png"
        assert p["question"] == source[p["id"]]["conversations"][0][0]
        assert p["annotation"] == source[p["id"]]["conversations"][0][1]
    m = json.load(open(os.path.join(workdir, "metrics.json")))
    assert m["tasks"]["VG"]["metric"] == "Recall@0.5" and "mean" in m["tasks"]["GC"]
    for task in ("VG", "RO", "GC", "MII"):
        table = open(os.path.join(workdir, "tables", f"{task}.md")).read()
        assert "| ct |" in table and "mean (8 modalities)" in table and "| pet | 0 |" in table
        assert os.path.getsize(os.path.join(workdir, "charts", f"{task}.png")) > 1000
        page = open(os.path.join(workdir, "gallery", f"{task}.html")).read()
        assert page.count("<img src='data:image/png;base64,") >= 2  # self-contained: shows inline anywhere
    assert "### Visual grounding" in open(os.path.join(workdir, "results.md")).read()


def test_resume_generates_only_missing_items(first_run, data_dir, tmp_path):
    workdir, first = first_run
    import shutil

    shutil.copytree(workdir, tmp_path / "w")
    path = tmp_path / "w" / "predictions" / "Test_RO.jsonl"
    kept = open(path).readlines()[:3]
    path.write_text("".join(kept) + '{"id": 4, "image": "tor')  # killed in the middle of a line
    again = eval_run.run(config(data_dir), str(tmp_path / "w"))
    assert again["generated"] == {"VG": 0, "RO": LIMIT - 3, "GC": 0, "MII": 0}
    assert sorted(p["id"] for p in lines(path)) == list(range(LIMIT))
    assert again["tasks"]["RO"] == first["tasks"]["RO"]  # greedy: the same answers again


def test_predictions_of_another_model_are_set_aside_not_resumed(first_run, data_dir, tmp_path):
    """A re-run in the same workdir with another model (here: another random initialisation) must not resume
    the first model's answers: they move to predictions/stale/ and every item is generated again. Unchanged
    settings resume as before; a prediction file with no record of what made it is set aside too."""
    workdir, _ = first_run
    import shutil

    shutil.copytree(workdir, tmp_path / "w")
    pred = tmp_path / "w" / "predictions"
    first_ro = lines(pred / "Test_RO.jsonl")
    c = config(data_dir)
    c.seed = 7  # a preset model is initialised from the seed
    other = eval_run.run(c, str(tmp_path / "w"))
    assert other["generated"] == {t: LIMIT for t in ("VG", "RO", "GC", "MII")}
    assert lines(pred / "stale" / "Test_RO.0.jsonl") == first_ro
    assert json.load(open(pred / "stale" / "Test_RO.0.made_by.json"))["checkpoint"] == "random initialisation, seed 0"
    assert eval_run.run(c, str(tmp_path / "w"))["generated"] == {t: 0 for t in other["generated"]}
    os.remove(pred / "Test_VG.made_by.json")  # e.g. written by an older version
    again = eval_run.run(c, str(tmp_path / "w"))
    assert again["generated"] == {"VG": LIMIT, "RO": 0, "GC": 0, "MII": 0}
    assert os.path.isfile(pred / "stale" / "Test_VG.1.jsonl")


def test_score_only_rescores_existing_files(first_run, data_dir, tmp_path):
    workdir, first = first_run
    files = [os.path.join(workdir, "predictions", f"Test_{t}.jsonl") for t in ("VG", "RO")]
    c = config(data_dir, **{"eval.predictions": tuple(files)})
    c.model.preset = ""  # no model at all
    out = eval_run.run(c, str(tmp_path))
    assert out["generated"] == {} and out["tasks"]["VG"] == first["tasks"]["VG"]
    # another system's file, scored under the same protocol
    other = tmp_path / "other_VG.jsonl"
    rows = [{"id": 0, "image": "ct_a.png", "question": "q", "annotation": "<box>(0,0),(100,100)</box>",
             "response": "<|box_start|>(0,0),(100,90)<|box_end|><|im_end|>"},
            {"id": 1, "image": "mr_b.png", "question": "q", "annotation": "<box>(0,0),(100,100)</box>",
             "response": ["(500,500),(600,600)"]}]
    other.write_text("\n".join(map(json.dumps, rows)) + "\n")
    c = config(data_dir, **{"eval.predictions": (str(other),)})
    c.model.preset = ""
    r = eval_run.run(c, str(tmp_path / "o"))["tasks"]["VG"]
    assert r["per_modality"] == pytest.approx({"ct": 1.0, "mr": 0.0}) and r["mean"] == pytest.approx(1 / 8)


def test_sasg_mode_keeps_the_most_agreed_candidate(data_dir, tmp_path):
    from clinkd_jax.eval import sasg

    c = config(data_dir, **{"eval.tasks": ("RO",), "eval.sasg_samples": 3, "eval.sasg_temperature": 1.0,
                            "eval.limit": 2, "eval.batch_size": 2})
    eval_run.run(c, str(tmp_path))
    for p in lines(tmp_path / "predictions" / "Test_RO.jsonl"):
        assert len(p["candidates"]) == 3
        best, scores = sasg.select(p["candidates"])
        assert p["response"] == p["candidates"][best] and p["sasg_scores"] == pytest.approx(scores)
        assert len(set(p["candidates"])) > 1  # sampled, not three copies of the greedy answer


def test_unevaluable_items_count_as_misses(data_dir, tmp_path):
    """An item whose image is missing is scored as an empty answer (a miss in the denominator, as the released
    scripts would score it), marked with its reason, tried again on resume; an item without a reference
    answer cannot be scored and is counted apart. results.md prints both counts."""
    items = json.load(open(os.path.join(data_dir, "Test_VG.json")))[:3]
    items[1]["id"] = "ct_00--missing--file"
    bad = tmp_path / "Test_VG.json"
    bad.write_text(json.dumps(items + [{"id": items[0]["id"]}]))
    c = config(data_dir, **{"eval.files": (str(bad),), "eval.data_dir": ""})
    out = eval_run.run(c, str(tmp_path / "w"))
    assert out["skipped"] == {"unreadable image": 1, "malformed item": 1} and out["generated"] == {"VG": 2}
    preds = {p["id"]: p for p in lines(tmp_path / "w" / "predictions" / "Test_VG.jsonl")}
    assert sorted(preds) == [0, 1, 2] and (preds[1]["response"], preds[1]["unevaluated"]) == ("", "unreadable image")
    vg = out["tasks"]["VG"]
    assert sum(vg["count"].values()) == sum(len(metrics.box_strings(i["conversations"][0][1])) for i in items)
    assert vg["unevaluated"] == {"unreadable image": 1}
    results = open(tmp_path / "w" / "results.md").read()
    assert "1 item(s) could not be evaluated and count as misses (empty answers): unreadable image 1" in results
    assert "Test items left out (no usable reference answer, not scorable): malformed item 1" in results
    again = eval_run.run(c, str(tmp_path / "w"))  # the miss is tried again (still missing), nothing else
    assert again["generated"] == {"VG": 0} and len(lines(tmp_path / "w" / "predictions" / "Test_VG.jsonl")) == 3


@pytest.mark.parametrize("change, message", [
    ({"eval.tasks": ("VG", "XX")}, "eval.tasks"),
    ({"eval.data_dir": "/nonexistent"}, "Test_VG.json not found"),
    ({"eval.predictions": ("/nonexistent/Test_VG.jsonl",)}, "eval.predictions"),
    ({"eval.sasg_samples": 4, "eval.sasg_temperature": 0.0}, "sasg_temperature"),
    ({"eval.sasg_similarity": "nope"}, "sasg_similarity"),
])
def test_config_errors_name_the_field(data_dir, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        eval_run.run(config(data_dir, **change), str(tmp_path))


def test_training_eval_curve_resumes_past_a_torn_line(data_dir, tmp_path):
    """eval.every_steps: a run killed while appending to eval_curve.jsonl resumes; the torn point and points
    after the resume step are dropped (evaluated again), earlier ones kept, step folders after it removed."""
    from clinkd_jax.eval.during_training import CURVE, EvalDuringTraining

    hook = EvalDuringTraining(config(data_dir, **{"eval.every_steps": 2}), str(tmp_path))
    (tmp_path / CURVE).write_text('{"step": 2, "VG": 0.1}\n{"step": 4, "VG": 0.2}\n{"step": 6, "VG": 0.')
    for step in (2, 4, 6):
        os.makedirs(hook.step_dir(step))
    hook.resume(4)
    assert hook.curve == [{"step": 2, "VG": 0.1}, {"step": 4, "VG": 0.2}]
    assert lines(tmp_path / CURVE) == hook.curve
    assert os.path.isdir(hook.step_dir(4)) and not os.path.exists(hook.step_dir(6))


def test_any_answer_is_scored_reported_and_drawn(data_dir, tmp_path, monkeypatch):
    """The model writes the untrusted-input cases (its decoded answers replaced in turn, after it has generated):
    every task's predictions keep them as written; Recall@0.5 equals ClinKD's scorer restated from the spec
    (tests/released_scorer.py: boxes as written); results.md counts the odd boxes; every gallery draws. Then the
    same file scored again through eval.predictions gives the same metrics."""
    import released_scorer
    from test_answers import CASES

    cases = list(CASES) + ["<box>(1,2),(inf,4)</box>", "A cyst.<|im_end|>\nsecond line\n"]
    real, served = eval_run.responses, []

    def written(tokens, recs, encoder, pcfg, n=1):
        texts = real(tokens, recs, encoder, pcfg, n)
        served.extend(cases[(len(served) + i) % len(cases)] for i in range(len(texts)))
        return served[-len(texts):]

    monkeypatch.setattr(eval_run, "responses", written)
    c = config(data_dir, **{"eval.limit": len(cases)})
    out = eval_run.run(c, str(tmp_path / "w"))
    files = tuple(str(tmp_path / "w" / "predictions" / f"Test_{t}.jsonl") for t in ("VG", "RO", "GC", "MII"))
    written_all = [p["response"] for f in files for p in lines(f)]
    assert set(written_all) == set(cases) and len(written_all) == len(served)  # each kept as written
    preds = lines(files[0])
    assert out["tasks"]["VG"]["mean"] == pytest.approx(released_scorer.vg_recall(preds), abs=1e-12)
    boxes = out["tasks"]["VG"]["answer_boxes"]
    assert boxes == answers.tally(p["response"] for p in preds) and boxes["not a box"] > 0
    assert f"the answers hold {boxes['boxes']} box(es): " in open(tmp_path / "w" / "results.md").read()
    for task in ("VG", "RO", "GC", "MII"):
        assert "image not shown" not in open(tmp_path / "w" / "gallery" / f"{task}.html").read()
    again = config(data_dir, **{"eval.predictions": files})
    again.model.preset = ""
    assert eval_run.run(again, str(tmp_path / "s"))["tasks"] == out["tasks"]
