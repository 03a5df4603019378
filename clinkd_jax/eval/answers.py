"""A model's answer read as untrusted input: its boxes as the scorer finds them, each either ordered and clipped
(with a note of what was changed) or marked as not a box (with the reason).

A tiny or half-trained model writes anything, a large one now and then: inverted corners, a zero-area box, values
below 0 or above 1000, three or five numbers, `nan`, unclosed or nested tags, several boxes. Every consumer of
generated text that draws or reports boxes (`predict`, `serve`, the evaluation's gallery) reads them here, so what
it shows is what the VG scorer found, and drawing never meets an impossible rectangle.

The metrics do not use the normalised form: they score the box as the model wrote it, exactly as ClinKD's
released scorer does (clinkd-spec §3.7; `eval.metrics`): a box whose corners are inverted has no intersection
with any reference (IoU 0, a miss), a box reaching outside 0-1000 is scored with its coordinates as written, an
unparsable one is IoU 0. Ordering or clipping it first would change Recall@0.5 against the published numbers.
"""

from __future__ import annotations

import dataclasses
import math

from clinkd_jax.data.markup import BOX_SCALE
from clinkd_jax.eval import metrics

SWAPPED = "corners swapped to top-left, bottom-right (scored as written: no overlap)"
CLIPPED = f"clipped to 0-{BOX_SCALE} (scored as written)"


@dataclasses.dataclass(frozen=True)
class AnswerBox:
    written: str  # the box as the model wrote it (the scorer's string, without tags)
    box: tuple[float, float, float, float] | None = None  # ordered corners inside [0, 1000]; None: not a box
    changed: tuple[str, ...] = ()  # what was done to `written` to get `box`
    not_a_box: str = ""  # why `written` cannot be a box

    def as_json(self, size: tuple[int, int]) -> dict:
        """For a result file: `written`, and `0-1000`, `pixels` (of an image of `size` = (height, width)) and
        `changed`, or `not_a_box` with the reason."""
        if self.box is None:
            return {"written": self.written, "not_a_box": self.not_a_box}
        h, w = size
        x1, y1, x2, y2 = self.box
        return {"written": self.written, "0-1000": [_plain(v) for v in self.box],
                "pixels": [round(x1 * w / BOX_SCALE, 1), round(y1 * h / BOX_SCALE, 1), round(x2 * w / BOX_SCALE, 1),
                           round(y2 * h / BOX_SCALE, 1)], "changed": list(self.changed)}


def _plain(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _numbers(written: str) -> tuple[list[float] | None, str]:
    """The scorer's reading of a box string (parentheses dropped, split on commas), or None and why not."""
    pieces = written.replace("(", "").replace(")", "").split(",")
    values = []
    for p in pieces:
        try:
            values.append(float(p))
        except ValueError:
            return None, f"{p.strip()[:40]!r} is not a number"
    if len(values) != 4:
        return None, f"{len(values)} numbers, a box has 4 (x1,y1),(x2,y2)"
    return values, ""


def normalise(written: str) -> AnswerBox:
    """One box string -> its ordered, clipped form with notes, or not a box with the reason."""
    values, why = _numbers(written)
    if values is None:
        return AnswerBox(written, not_a_box=why)
    if not all(math.isfinite(v) for v in values):
        return AnswerBox(written, not_a_box="a coordinate is not a finite number")
    x1, y1, x2, y2 = values
    flat = x1 == x2 or y1 == y2
    changed = []
    if x1 > x2 or y1 > y2:
        changed.append(SWAPPED)
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    clipped = [min(max(v, 0.0), float(BOX_SCALE)) for v in (x1, y1, x2, y2)]
    if clipped != [x1, y1, x2, y2]:
        changed.append(CLIPPED)
    x1, y1, x2, y2 = clipped
    if x1 == x2 or y1 == y2:  # nothing to draw; scored as written it cannot hit either (no intersection)
        return AnswerBox(written, not_a_box=f"zero area ({'a point or a line' if flat else 'outside the image'})")
    return AnswerBox(written, (x1, y1, x2, y2), tuple(changed))


def read_boxes(response: str) -> list[AnswerBox]:
    """Every box the VG scorer finds in a response (after the released post-processing), in order."""
    return [normalise(b) for b in metrics.predicted_box_strings(metrics.extract_information(response))]


def tally(responses) -> dict[str, int]:
    """What the boxes of many responses look like: found, with corners swapped, reaching outside 0-1000, not a box
    (the evaluation reports it beside Recall@0.5, which scores each as written)."""
    out = {"boxes": 0, "corners swapped": 0, "outside 0-1000": 0, "not a box": 0}
    for r in responses:
        for b in read_boxes(r):
            out["boxes"] += 1
            out["corners swapped"] += SWAPPED in b.changed
            out["outside 0-1000"] += CLIPPED in b.changed
            out["not a box"] += b.box is None
    return out
