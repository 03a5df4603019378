"""SASG selection and the default similarity, on hand-computed cases."""

import pytest

from clinkd_jax.eval import sasg


def test_rouge_l_hand_computed():
    # LCS("the left kidney", "left kidney is") = 2 -> P = R = 2/3 -> F1 = 2/3
    assert sasg.rouge_l("The left kidney", "left kidney is") == pytest.approx(2 / 3)
    assert sasg.rouge_l("liver", "heart") == 0.0
    assert sasg.rouge_l("", "") == 1.0 and sasg.rouge_l("", "x") == 0.0


def test_box_answers_compare_boxes_and_words():
    a = "<|object_ref_start|>liver<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|>"
    b = "<|object_ref_start|>liver<|object_ref_end|><|box_start|>(0,0),(100,50)<|box_end|>"
    assert sasg.box_agreement(a, b) == pytest.approx(0.5)
    assert sasg.overlap(a, b) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)  # same words, half-overlapping box
    assert sasg.overlap(a, "liver") == pytest.approx(0.5 * 0 + 0.5 * 1.0)  # a missing box scores 0 on boxes


def test_mutual_agreement_selection():
    # sim(0,1) = F1(P=1, R=2/3) = 0.8; both disagree with "heart" -> scores [0.4, 0.4, 0]; tie -> first
    best, scores = sasg.select(["liver lesion", "liver lesion here", "heart"])
    assert best == 0 and scores == pytest.approx([0.4, 0.4, 0.0])
    assert sasg.select(["only one"]) == (0, [1.0])


def test_reference_selection_and_plugins():
    assert sasg.select(["heart", "the liver"], reference="liver")[0] == 1
    boxes = ["<box>(0,0),(10,10)</box>", "<box>(0,0),(100,95)</box>"]
    assert sasg.select(boxes, reference="<box>(0,0),(100,100)</box>", similarity="box_iou")[0] == 1
    assert sasg.select(["a", "bb"], reference="bb", similarity=lambda x, y: float(x == y))[0] == 1
    assert sasg.resolve("clinkd_jax.eval.sasg:rouge_l") is sasg.rouge_l
    with pytest.raises(ValueError, match="unknown similarity"):
        sasg.resolve("nope")
    with pytest.raises(ValueError):
        sasg.select([])
