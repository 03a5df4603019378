"""Med-GRIT scoring quirks, each checked on a hand-computed case (clinkd-spec §3.6-3.7)."""

import json

import pytest

from clinkd_jax.data import dataset
from clinkd_jax.eval import metrics as M


@pytest.mark.parametrize("raw, expected", [
    ("The liver.<|im_end|>", "The liver."),  # rule 1: cut at the first '.<|im_end|>', keep the period
    ("A.<|im_end|>\nB\nC", "A."),  # rule 1 runs before the newline rule
    ("liver<|im_end|>", "liver<|im_end|>"),  # a bare <|im_end|> (no period, no newline) is kept
    ("left<|im_end|>\nkidney", "leftkidney"),  # rule 2 deletes '<|im_end|>\n' only
    ("first\nsecond\nthird", "second"),  # rule 3: the text between the first two newlines
    ("x\n\ny", ""),
    ("one line\n", "one line"),  # a single newline: nothing between two newlines
    (" answer <|endoftext|><|endoftext|>", "answer"),  # rule 4, then strip
])
def test_extract_information(raw, expected):
    assert M.extract_information(raw) == expected


def pred(image, annotation, response, i=0):
    return {"id": i, "image": image, "question": "q", "annotation": annotation, "response": response}


REF = "<ref>liver</ref><box>(0,0),(100,100)</box>"


@pytest.mark.parametrize("response, hit", [
    ("<box>(0,0),(100,50)</box>", 0),  # IoU exactly 0.5: strict '>' -> miss
    ("<box>(0,0),(100,51)</box>", 1),  # IoU 0.51
    ("<|object_ref_start|>liver<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|><|im_end|>", 1),  # fallback
    ("<|box_start|>(0, 0),(100,100)<|box_end|>", 0),  # the fallback pattern allows no spaces
    ("<box>(0,0),(10,10)</box> (0,0),(100,100)", 0),  # primary boxes found -> the fallback is not used
    ("<box>abc</box>(0,0),(100,100)", 0),  # unparsable primary box -> IoU 0, still no fallback
    ("no box at all", 0),
    ("<box>(0,0),(100,100)</box>.<|im_end|>", 1),
])
def test_vg_single_item(response, hit):
    assert M.vg_item_hits(REF, response) == (hit, 1)


def test_vg_reuse_skip_and_modality_mean():
    two = "<box>(0,0),(100,100)</box> and <box>(0,0),(100,90)</box>"
    preds = [
        pred("ct_a.png", two, "<box>(0,0),(100,95)</box>"),  # one prediction hits both references (reused)
        pred("ct_b.png", REF, "<box>(500,500),(600,600)</box>"),  # miss
        pred("ct_c.png", "no boxes here", "<box>(0,0),(1,1)</box>"),  # skipped: annotation has no box
        pred("mr_d.png", REF, "(0,0),(100,100)"),
    ]
    r = M.vg_recall(preds)
    assert r["count"] == {"ct": 3, "mr": 1}
    assert r["per_modality"]["ct"] == pytest.approx(2 / 3, rel=1e-7)  # 2 hits / (3 boxes + 1e-8)
    assert r["per_modality"]["mr"] == pytest.approx(1.0, rel=1e-7)
    assert r["mean"] == pytest.approx((2 / 3 + 1) / 8, rel=1e-7)  # 6 empty modalities count 0


def test_iou_formula():
    assert M.iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)  # no +1 on the sides
    assert M.iou(None, [0, 0, 1, 1]) == 0.0
    assert M.iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0


@pytest.mark.parametrize("annotation, response, ok", [
    ("Liver", "The LIVERS are enlarged", True),  # lower-cased, substring: 'liver' in 'livers'
    ("left kidney", "kidney, left.", True),  # every piece anywhere
    ("left kidney", "kidney", False),
    ("liver.", "liver", False),  # punctuation stays attached to the piece
    ("left  kidney", "left kidney", True),  # a double space gives an empty piece, always contained
    ("liver", "x\nkidney\nliver", False),  # the response is post-processed first (second line only)
])
def test_roc_containment(annotation, response, ok):
    assert M.roc_correct(annotation, response) is ok


def test_roc_accuracy_per_modality():
    preds = [pred("x_1.png", "lung", "lung"), pred("x_2.png", "lung", "heart"),
             pred("fundus_3.png", "disc", "optic disc")]
    r = M.roc_accuracy(preds)
    assert r["per_modality"] == {"x": 0.5, "fundus": 1.0}
    assert r["mean"] == pytest.approx(1.5 / 8)


def test_read_predictions(tmp_path):
    p = tmp_path / "Test_RO.jsonl"
    lines = [pred("ct_1.png", "a", ["liver", "<|im_end|>"]), pred("ct_2.png", "b", "x", 1)]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = M.read_predictions(str(p))
    assert got[0]["response"] == "liver<|im_end|>"  # the released script's list responses are joined
    p.write_text(json.dumps(lines[1]) + "\n{broken\n")
    with pytest.raises(ValueError, match="Test_RO.jsonl:2"):
        M.read_predictions(str(p))
    p.write_text(json.dumps({"id": 0, "image": "ct.png"}) + "\n")
    with pytest.raises(ValueError, match="missing question, annotation, response"):
        M.read_predictions(str(p))


@pytest.mark.parametrize("name, task", [
    ("Test_VG.json", "VG"), ("preds/Test_MII.jsonl", "MII"), ("medgrit_test_chatlm_RO_img_coord_OneConv.json", "RO"),
    ("x_GC_y.jsonl", "GC"), ("Test_other.json", None),
])
def test_task_of(name, task):
    assert dataset.task_of(name) == task
