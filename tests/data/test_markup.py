"""BiRD <-> Qwen2-VL markup, box parsing and validation."""

import pytest

from clinkd_jax.data import markup as M

BIRD = "<img>ct_00--a--b--x_0001.png</img> The <ref>left kidney</ref><box>(412,318),(530,447)</box> and <box>(1,2),(3,4)</box>"
QWEN = ("The <|object_ref_start|>left kidney<|object_ref_end|><|box_start|>(412,318),(530,447)<|box_end|> and "
        "<|box_start|>(1,2),(3,4)<|box_end|>")


def test_both_directions():
    assert M.to_qwen2vl(BIRD) == QWEN
    assert M.to_bird(QWEN) == BIRD.split("</img> ", 1)[1]
    assert M.to_qwen2vl(M.to_bird(QWEN)) == QWEN


def test_parse_boxes_either_markup():
    assert M.parse_boxes(BIRD) == [(412, 318, 530, 447), (1, 2, 3, 4)]
    assert M.parse_boxes(QWEN) == [(412, 318, 530, 447), (1, 2, 3, 4)]
    assert M.parse_boxes("<box>( 1 , 2 ),(3,4)</box>") == [(1, 2, 3, 4)]


@pytest.mark.parametrize("text, message", [
    ("<box>(0.1,0.2),(0.3,0.4)</box>", "malformed box '\\(0.1,0.2\\),\\(0.3,0.4\\)'"),
    ("<box>(1,2)</box>", "malformed box"),
    ("<box>(10,20),(1001,40)</box>", r"box \(10, 20, 1001, 40\) is outside the 0-1000 coordinate scale"),
    ("<box>(-1,20),(30,40)</box>", "outside the 0-1000"),
    ("<box>(50,20),(30,40)</box>", "corners swapped"),
])
def test_bad_boxes_are_reported_not_altered(text, message):
    with pytest.raises(M.MarkupError, match=message):
        M.validate_boxes(text)


def test_scale_is_configurable():
    M.validate_boxes("<box>(0,0),(1,1)</box>", scale=1)
    with pytest.raises(M.MarkupError):
        M.validate_boxes("<box>(0,0),(2,1)</box>", scale=1)
