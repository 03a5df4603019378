"""BiRD <-> Qwen2-VL markup, box parsing and validation."""

import pytest

from clinkd_jax.data import markup as M

BIRD = ("<img>ct_00--a--b--x_0001.png</img> The <ref>left kidney</ref><box>(412,318),(530,447)</box> and "
        "<box>(1,2),(3,4)</box>")
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
    ("<box>(0.1,0.2),(0.3,0.4)</box>",
     r"box \(0.1, 0.2, 0.3, 0.4\) has fractional coordinates in a 0-1000 integer file"),
    ("<box>(1,2),(a,4)</box>", "malformed box '\\(1,2\\),\\(a,4\\)'"),
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


@pytest.mark.parametrize("texts, fmt", [
    (["<box>(0.1,0.2),(0.3,0.4)</box>", "<|box_start|>(0,0.5),(1,1.0)<|box_end|>"], "0-1"),
    (["<box>(0,0),(1,1)</box>"], "0-1000"),  # integers only: the model's scale, even when small
    # mixed: the float box is the odd one
    (["<box>(0.1,0.2),(0.3,0.4)</box>", "<box>(10,20),(300,400)</box>"], "0-1000"),
    (["no boxes here"], "0-1000"),
])
def test_box_format_is_told_per_file(texts, fmt):
    assert M.box_format_of(texts) == fmt


def test_unit_boxes_are_brought_to_the_model_scale():
    text = "<ref>cyst</ref><box>(0.1234,0.5),(.75, 1.0)</box> and <|box_start|>(0,0.0005),(0.9995,1)<|box_end|>"
    out = M.to_model_scale(text, "0-1")
    assert out == "<ref>cyst</ref><box>(123,500),(750,1000)</box> and <|box_start|>(0,1),(1000,1000)<|box_end|>"
    M.validate_boxes(out)  # now a valid 0-1000 integer box
    assert M.to_model_scale(text, "0-1000") == text
    with pytest.raises(M.MarkupError, match="malformed box"):
        M.to_model_scale("<box>(0.1,0.2)</box>", "0-1")
