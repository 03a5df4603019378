"""Grounding markup: BiRD / Qwen-VL tags <-> Qwen2-VL special tokens, and box validation.

BiRD (Med-GRIT files):   <ref>left kidney</ref><box>(412,318),(530,447)</box>   and <img>path</img>
Qwen2-VL (model text):   <|object_ref_start|>left kidney<|object_ref_end|><|box_start|>(412,318),(530,447)<|box_end|>

Coordinates are integers on the file's scale (0-1000 for Qwen-VL / Qwen2-VL, corners top-left and
bottom-right) and are never rescaled here; a malformed or out-of-scale box is reported, not altered.
"""

from __future__ import annotations

import re

BOX_SCALE = 1000

IMG_TAG = re.compile(r"<img>.*?</img>\s*", re.S)
BIRD_BOX = re.compile(r"<box>(.*?)</box>", re.S)
QWEN_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
BOX_BODY = re.compile(r"^\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*$")

_TO_QWEN = (("<ref>", "<|object_ref_start|>"), ("</ref>", "<|object_ref_end|>"),
            ("<box>", "<|box_start|>"), ("</box>", "<|box_end|>"))


class MarkupError(ValueError):
    """A box that is malformed or outside the coordinate scale."""


def strip_image_tag(text: str) -> str:
    """Remove BiRD's `<img>path</img>` (the image is given to the model separately)."""
    return IMG_TAG.sub("", text).strip()


def to_qwen2vl(text: str) -> str:
    """BiRD/Qwen-VL markup -> Qwen2-VL special tokens (the `<img>` tag is removed)."""
    text = strip_image_tag(text)
    for old, new in _TO_QWEN:
        text = text.replace(old, new)
    return text


def to_bird(text: str) -> str:
    """Qwen2-VL special tokens -> BiRD/Qwen-VL markup, so predictions score with the BiRD scripts."""
    for old, new in _TO_QWEN:
        text = text.replace(new, old)
    return text


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every box in either markup, as (x1, y1, x2, y2) integers; raises MarkupError on a malformed one."""
    out = []
    for body in BIRD_BOX.findall(text) + QWEN_BOX.findall(text):
        m = BOX_BODY.match(body)
        if not m:
            raise MarkupError(f"malformed box {body!r} (expected '(x1,y1),(x2,y2)' with integers)")
        out.append(tuple(int(v) for v in m.groups()))
    return out


def validate_boxes(text: str, scale: int = BOX_SCALE) -> None:
    """Raise MarkupError unless every box is well-formed, inside [0, scale] and has x1<=x2, y1<=y2."""
    for box in parse_boxes(text):
        x1, y1, x2, y2 = box
        if min(box) < 0 or max(box) > scale:
            raise MarkupError(f"box {box} is outside the 0-{scale} coordinate scale")
        if x1 > x2 or y1 > y2:
            raise MarkupError(f"box {box} has its corners swapped (expected top-left then bottom-right)")
