"""Grounding markup: BiRD / Qwen-VL tags <-> Qwen2-VL special tokens, and box validation.

BiRD (Med-GRIT files):   <ref>left kidney</ref><box>(412,318),(530,447)</box>   and <img>path</img>
Qwen2-VL (model text):   <|object_ref_start|>left kidney<|object_ref_end|><|box_start|>(412,318),(530,447)<|box_end|>

Qwen2-VL reads and writes corners (top-left, bottom-right) as integers on a 0-1000 scale relative to the
image. Data files come in two box formats, told apart per file (`box_format_of`): "0-1000" integers (the
Qwen-VL convention) and "0-1" floats (an older BiRD format). A "0-1" file is brought to the model's scale
(`to_model_scale`: x -> round(1000 x)); otherwise boxes are never altered, and a malformed or
out-of-range box is reported, not fixed.

What the model reads and writes (`data.box_markup`, `BOX_MARKUPS`): "0-1000" (default) is Med-GRIT's and
ClinKD's markup, the 0-1000 integers above; "absolute" is Qwen2.5-VL's own grounding convention, pixel
coordinates of the image the model sees (after resizing), between the same box tokens. With "absolute", text is
converted on its way in (`to_absolute`) and the model's answers on their way out (`from_absolute`), so data files,
prediction files and scores stay on the 0-1000 scale. "json" is Qwen3-VL's own convention, the same 0-1000
relative corners written as JSON: `[{"bbox_2d": [412, 318, 530, 447], "label": "left kidney"}]` for a named
object, `[412, 318, 530, 447]` for a bare box (`to_json` in, `from_json` out, back to Med-GRIT's tags).
"""

from __future__ import annotations

import json
import math
import re

from clinkd_jax.errors import UserError

BOX_SCALE = 1000
BOX_FORMATS = ("0-1000", "0-1")  # integers on the model's scale | floats relative to the image
# the model's boxes: Med-GRIT's 0-1000 | pixels of its input (Qwen2.5-VL's) | 0-1000 in JSON (Qwen3-VL's)
BOX_MARKUPS = ("0-1000", "absolute", "json")

IMG_TAG = re.compile(r"<img>.*?</img>\s*", re.S)
BIRD_BOX = re.compile(r"<box>(.*?)</box>", re.S)
QWEN_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_NUM = r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*"
BOX_BODY = re.compile(rf"^\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*$")

_TO_QWEN = (("<ref>", "<|object_ref_start|>"), ("</ref>", "<|object_ref_end|>"),
            ("<box>", "<|box_start|>"), ("</box>", "<|box_end|>"))


class MarkupError(UserError):
    """A box that is malformed or outside the coordinate scale."""

    kind = "data"


# The four Med-GRIT tasks' questions, as the demo's test files ask them and `clinkd_jax.predict` asks a model
QUESTIONS = {"VG": "Where is the <ref>{obj}</ref> in this image?", "RO": "What is the object in {box}?",
             "GC": "Describe the region {box}.", "MII": "Describe this image."}


def box_tag(box) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` of four integers (0-1000)."""
    return "<box>({},{}),({},{})</box>".format(*box)


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


def box_bodies(text: str) -> list[str]:
    return BIRD_BOX.findall(text) + QWEN_BOX.findall(text)


_BOX_SPANS = tuple(re.compile(f"({re.escape(a)})(.*?)({re.escape(b)})", re.S)
                   for a, b in (("<box>", "</box>"), ("<|box_start|>", "<|box_end|>")))


def _numbers(body: str) -> tuple[str, ...]:
    m = BOX_BODY.match(body)
    if not m:
        raise MarkupError(f"malformed box {body!r} (expected '(x1,y1),(x2,y2)')")
    return m.groups()


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Every box in either markup, as (x1, y1, x2, y2) numbers; raises MarkupError on a malformed one."""
    return [tuple(float(v) if "." in v else int(v) for v in _numbers(body)) for body in box_bodies(text)]


def box_format_of(texts) -> str:
    """"0-1" when every well-formed box in `texts` (one data file) has all coordinates in [0, 1] and at least
    one written with a decimal point; else "0-1000" (also for a file without boxes)."""
    values = []
    for text in texts:
        for body in box_bodies(text):
            m = BOX_BODY.match(body)
            values += m.groups() if m else []
    if values and any("." in v for v in values) and all(0.0 <= float(v) <= 1.0 for v in values):
        return "0-1"
    return "0-1000"


def to_model_scale(text: str, box_format: str) -> str:
    """Boxes of a "0-1" file as the model's 0-1000 integers (round half up); "0-1000" text is returned as is.
    Raises MarkupError on a malformed box."""
    if box_format == "0-1000":
        return text

    def scaled(m: re.Match) -> str:
        x1, y1, x2, y2 = (math.floor(float(v) * BOX_SCALE + 0.5) for v in _numbers(m.group(2)))
        return f"{m.group(1)}({x1},{y1}),({x2},{y2}){m.group(3)}"

    for pattern in _BOX_SPANS:
        text = pattern.sub(scaled, text)
    return text


# every grounding tag in either markup, named as BiRD writes it
_TAGS = re.compile(r"</?box>|</?ref>|<\|(?:box|object_ref)_(?:start|end)\|>")
_TAG_NAMES = {"<|box_start|>": "<box>", "<|box_end|>": "</box>", "<|object_ref_start|>": "<ref>",
              "<|object_ref_end|>": "</ref>"}


def tag_problem(text: str) -> str | None:
    """Why the <box> / <ref> tags of a text (either markup) do not pair up, or None: an opening tag inside an open
    one (nested), a closing tag without its opening one, a tag left open."""
    open_tag = None
    for m in _TAGS.finditer(text):
        tag = _TAG_NAMES.get(m.group(0), m.group(0))
        if not tag.startswith("</"):
            if open_tag:
                return f"{tag} inside an open {open_tag}"
            open_tag = tag
        elif open_tag != tag.replace("/", ""):
            return f"{tag} without its opening tag" if open_tag is None else f"{tag} closes {open_tag}"
        else:
            open_tag = None
    return f"{open_tag} is never closed" if open_tag else None


def validate_boxes(text: str, scale: int = BOX_SCALE) -> None:
    """Raise MarkupError unless the tags pair up and every box has integer corners inside [0, scale] with x1<=x2,
    y1<=y2."""
    problem = tag_problem(text)
    if problem:
        raise MarkupError(f"unpaired grounding tags: {problem}")
    for box in parse_boxes(text):
        x1, y1, x2, y2 = box
        if any(isinstance(v, float) for v in box):
            raise MarkupError(f"box {box} has fractional coordinates in a 0-{scale} integer file")
        if min(box) < 0 or max(box) > scale:
            raise MarkupError(f"box {box} is outside the 0-{scale} coordinate scale")
        if x1 > x2 or y1 > y2:
            raise MarkupError(f"box {box} has its corners swapped (expected top-left then bottom-right)")


def _rescale(text: str, fx: float, fy: float, limit: tuple[int, int] | None) -> str:
    def scaled(m: re.Match) -> str:
        try:
            x1, y1, x2, y2 = (float(v) for v in _numbers(m.group(2)))
        except MarkupError:
            return m.group(0)  # a malformed box stays as written (the scorer counts it as a miss)
        if not all(math.isfinite(v) for v in (x1 * fx, y1 * fy, x2 * fx, y2 * fy)):
            return m.group(0)  # hundreds of digits: as written, for the scorer to judge
        xs = [math.floor(v * fx + 0.5) for v in (x1, x2)]
        ys = [math.floor(v * fy + 0.5) for v in (y1, y2)]
        if limit:
            xs, ys = [min(max(v, 0), limit[0]) for v in xs], [min(max(v, 0), limit[1]) for v in ys]
        return f"{m.group(1)}({xs[0]},{ys[0]}),({xs[1]},{ys[1]}){m.group(3)}"

    for pattern in _BOX_SPANS:
        text = pattern.sub(scaled, text)
    return text


def to_absolute(text: str, size: tuple[int, int]) -> str:
    """0-1000 boxes -> pixel coordinates of an image of `size` = (height, width), rounded half up."""
    h, w = size
    return _rescale(text, w / BOX_SCALE, h / BOX_SCALE, None)


def from_absolute(text: str, size: tuple[int, int]) -> str:
    """Pixel boxes (as a model trained with "absolute" writes them) -> 0-1000, clipped to the scale."""
    h, w = size
    return _rescale(text, BOX_SCALE / w, BOX_SCALE / h, (BOX_SCALE, BOX_SCALE))


# ------------------------------------------------------------------------------ Qwen3-VL's JSON boxes
_REF_BOXES = re.compile(r"(?:<ref>(.*?)</ref>)?(<box>.*?</box>(?:\s*<box>.*?</box>)*)", re.S)
_JSON_LIST = re.compile(r"(?:```json\s*)?(\[(?:[^\[\]]|\[[^\[\]]*\])*\])(?:\s*```)?", re.S)


def _corners(body: str) -> list[int]:
    return [math.floor(float(v) + 0.5) for v in _numbers(body)]


def to_json(text: str) -> str:
    """Med-GRIT tags -> Qwen3-VL's JSON boxes: a <ref> with its boxes -> a list of {"bbox_2d", "label"} objects, a
    bare box -> [x1, y1, x2, y2]. Raises MarkupError on a malformed box."""

    def one(m: re.Match) -> str:
        label, boxes = m.group(1), BIRD_BOX.findall(m.group(2))
        if label is None:
            return " ".join(json.dumps(_corners(b)) for b in boxes)
        return json.dumps([{"bbox_2d": _corners(b), "label": label} for b in boxes], ensure_ascii=False)

    return _REF_BOXES.sub(one, text)


def _finite_number(x) -> bool:
    try:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x + 0.5)
    except OverflowError:
        return False


def from_json(text: str) -> str:
    """A model's JSON boxes -> Med-GRIT tags (labelled objects -> <ref>label</ref><box>..</box>..., 4-number lists ->
    <box>..</box>), for the files and scorers; JSON that is not a box list is left as written."""

    def box(v) -> str | None:
        if isinstance(v, list) and len(v) == 4 and all(_finite_number(x) for x in v):
            return "<box>({},{}),({},{})</box>".format(*(math.floor(x + 0.5) for x in v))
        return None  # NaN, Infinity, 1e999, a 400-digit integer: not a box, left as written

    def one(m: re.Match) -> str:
        try:
            value = json.loads(m.group(1))
        except ValueError:
            return m.group(0)
        if box(value):
            return box(value)
        if isinstance(value, list) and value and all(isinstance(o, dict) and box(o.get("bbox_2d")) for o in value):
            out, last = "", None
            for o in value:  # consecutive boxes of one label share its <ref>
                label = str(o.get("label", ""))
                out += ("" if label == last else f"<ref>{label}</ref>") + box(o["bbox_2d"])
                last = label
            return out
        return m.group(0)

    return _JSON_LIST.sub(one, text)
