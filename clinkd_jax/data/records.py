"""Readers: Med-GRIT / BiRD JSON (test and training layouts) and LLaMA-Factory ShareGPT files, to one
record type. Bad items are either a `DataError` naming the file and item (strict) or a counted skip.

Med-GRIT test item:   {"id": "<image stem>", "conversations": [["question <img>..</img>", "answer"], ...]}
Med-GRIT train item:  {"id": "<image stem>", "conversations": [{"from": "user", "value": ...}, ...]}
ShareGPT item:        {"messages": [{"role": "user", "content": ...}, ...], "images": ["x.png"]}

Modality = the image name's prefix before the first "_" (clinkd-spec §3.2).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading

from clinkd_jax.data import markup
from clinkd_jax.errors import UserError

_log = logging.getLogger("clinkd_jax.data")
MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class DataError(UserError):
    """A bad input item, named by file and item."""

    kind = "data"


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str  # BiRD markup as stored in the file


@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation about (at most a few) images."""

    id: str
    images: tuple  # resolved paths (or decoded arrays, from the TFDS source)
    turns: tuple[Turn, ...]
    modality: str
    source: str  # "file.json[17]", for messages
    index: int = -1  # position of the item in its file (the "id" of a BiRD/ClinKD prediction line)

    @property
    def answer(self) -> str:
        """The first assistant answer (the reference for single-turn test items)."""
        return next(t.text for t in self.turns if t.role == "assistant")

    @property
    def question(self) -> str:
        return next(t.text for t in self.turns if t.role == "user")


# Items used in part: counted and reported with the skips, but not "skipped" (and not an error in strict mode)
TRUNCATED = "trailing exchanges dropped to fit the longest text bucket"
PARTIAL = (TRUNCATED,)


class SkipLog:
    """Counts skipped (and shortened, `PARTIAL`) items by reason, thread-safe, with a few examples of each
    for the report."""

    def __init__(self, strict: bool = False, examples: int = 3):
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._keep = examples
        self._lock = threading.Lock()

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record a skip; in strict mode raise instead (not for an item kept in part)."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict and reason not in PARTIAL:
            raise DataError(message)
        with self._lock:
            self.counts[reason] += 1
            if len(self.examples[reason]) < self._keep:
                self.examples[reason].append(message)

    def merge(self, counts: dict[str, int]) -> None:
        with self._lock:
            self.counts.update(counts)

    @property
    def total(self) -> int:
        """Items left out (shortened ones not included)."""
        return skipped(self.counts)

    def report(self) -> str:
        lines = []
        for title, part in (("skipped", False), ("shortened (kept in part)", True)):
            reasons = [(r, n) for r, n in self.counts.most_common() if (r in PARTIAL) == part]
            if reasons:
                lines.append(f"{sum(n for _, n in reasons)} item(s) {title}:")
            for reason, n in reasons:
                example = "".join(f"\n          e.g. {e}" for e in self.examples[reason][:1])
                lines.append(f"  {n:6d}  {reason}{example}")
        return "\n".join(lines) or "no items skipped"


def skipped(counts: dict[str, int]) -> int:
    """How many items `counts` (reason -> n) left out; items kept in part are not among them."""
    return sum(n for r, n in counts.items() if r not in PARTIAL)


def skip_summary(counts: dict[str, int]) -> str:
    """"skipped N" (", shortened M" when trailing exchanges were dropped), for one-line run summaries."""
    part = sum(counts.values()) - skipped(counts)
    return f"skipped {skipped(counts)}" + (f", shortened {part}" if part else "")


def modality_of(image_name: str) -> str:
    return os.path.basename(image_name).split("_", 1)[0].lower()


def _load_json(path: str) -> list:
    """A JSON list of items, or (`*.jsonl`) one item per line."""
    try:
        with open(path) as f:
            if not path.endswith(".jsonl"):
                items = json.load(f)
            else:
                items = []
                for n, line in enumerate(f, 1):
                    try:
                        items += [json.loads(line)] if line.strip() else []
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {n}: not valid JSON ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    return items


# Qwen2-VL's structural tokens: written literally inside a turn they would break the chat layout
STRUCTURAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
                     "<|im_end|>", "<|endoftext|>")
IMAGE_EXTS = (".png", ".dcm", ".dicom", ".jpg", ".jpeg")  # Med-GRIT ids carry no extension: tried in this order


def text_problem(text: str, role: str = "assistant") -> tuple[str, str] | None:
    """(skip reason, detail) when a turn's text cannot be trained on (a literal structural token, a
    malformed box); None when it can."""
    token = next((s for s in STRUCTURAL_TOKENS if s in text), None)
    if token:
        return "special token in text", f"{token} written literally in a {role} turn"
    try:
        markup.validate_boxes(text)
    except markup.MarkupError as e:
        return "bad box", str(e)
    return None


def _check(turns, images, where, log: SkipLog, check_images: bool) -> bool:
    """Item-level validation shared by all readers; returns False (after logging) for a bad item."""
    if not any(t.role == "assistant" for t in turns) or any(
        t.role == "assistant" and not t.text.strip() for t in turns
    ):
        log.skip("empty or missing answer", where)
        return False
    for t in turns:
        problem = text_problem(t.text, t.role)
        if problem:
            reason, detail = problem
            log.skip(reason, where, detail)
            return False
    for image in images:
        if modality_of(image) not in MODALITIES:
            log.skip("unknown modality prefix", where, f"{os.path.basename(image)!r}; known: {', '.join(MODALITIES)}")
            return False
        if check_images and not os.path.isfile(image):
            log.skip("missing image file", where, image)
            return False
    return True


def _to_model_scale(path: str, items: list, box_format: str) -> list:
    """[(index, where, turns, ...)] with every box on the model's 0-1000 scale. `box_format` "auto" tells the
    file's format from its boxes (logged); a box that cannot be converted is left for `_check` to report."""
    if box_format == "auto":
        texts = [t.text for _, _, turns, *_ in items for t in turns]
        box_format = markup.box_format_of(texts)
        n = sum(len(markup.box_bodies(t)) for t in texts)
        if n:
            _log.info("%s: %d box(es), %s%s", os.path.basename(path), n, box_format,
                      " floats: converted to the model's 0-1000 integers" if box_format == "0-1" else " integers")
    elif box_format not in markup.BOX_FORMATS:
        raise DataError(f"box format {box_format!r} is not one of auto, {', '.join(markup.BOX_FORMATS)}")
    out = []
    for i, where, turns, *rest in items:
        try:
            turns = tuple(Turn(t.role, markup.to_model_scale(t.text, box_format)) for t in turns)
        except markup.MarkupError:
            pass  # reported by _check, unchanged
        out.append((i, where, turns, *rest))
    return out


def image_path(image_dir: str, stem: str, exts=IMAGE_EXTS) -> str:
    """<image_dir>/<stem><ext> for the first extension in `exts` whose file exists (the first one when
    none does, for the missing-file report); a stem that already ends in one of them is taken as is."""
    if stem.lower().endswith(tuple(exts)):
        return os.path.join(image_dir, stem)
    candidates = [os.path.join(image_dir, stem + e) for e in exts]
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])


def read_medgrit(
    path: str, image_dir: str, *, log: SkipLog | None = None, check_images: bool = True,
    box_format: str = "auto", image_ext=IMAGE_EXTS,
) -> list[Record]:
    """Med-GRIT / BiRD JSON, test (`[[q, a], ...]`) or training (`[{"from", "value"}, ...]`) layout. The image
    of item `id` is <image_dir>/<id><ext>, the first of `image_ext` that exists (PNG, DICOM, ...)."""
    log = log or SkipLog()
    parsed = []
    for i, item in enumerate(_load_json(path)):
        where = f"{os.path.basename(path)}[{i}]"
        if not (isinstance(item, dict) and isinstance(item.get("id"), str)
                and isinstance(item.get("conversations"), list)):
            log.skip("malformed item", where, "needs a string 'id' and a list 'conversations'")
            continue
        where = f"{where} id={item['id']}"
        turns = []
        try:
            for conv in item["conversations"]:
                if isinstance(conv, (list, tuple)) and len(conv) == 2:
                    turns += [Turn("user", str(conv[0])), Turn("assistant", str(conv[1] or ""))]
                elif isinstance(conv, dict) and "value" in conv:
                    turns.append(Turn(ROLES[str(conv.get("from", "")).lower()], str(conv["value"] or "")))
                else:
                    raise KeyError(conv)
        except KeyError:
            log.skip("malformed item", where, "each conversation entry must be [question, answer] or {from, value}")
            continue
        parsed.append((i, where, tuple(turns), item["id"]))
    records = []
    for i, where, turns, rid in _to_model_scale(path, parsed, box_format):
        image = image_path(image_dir, rid, image_ext)
        if _check(turns, [image], where, log, check_images):
            records.append(Record(rid, (image,), turns, modality_of(image), where, i))
    return records


def read_sharegpt(
    path: str, image_dir: str, *, log: SkipLog | None = None, check_images: bool = True, box_format: str = "auto",
) -> list[Record]:
    """LLaMA-Factory ShareGPT (`messages` with `role`/`content`, `images`): what ClinKD trained from."""
    log = log or SkipLog()
    parsed = []
    for i, item in enumerate(_load_json(path)):
        where = f"{os.path.basename(path)}[{i}]"
        msgs = item.get("messages") if isinstance(item, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
            log.skip("malformed item", where, "needs 'messages': [{role, content}, ...]")
            continue
        try:
            turns = [Turn(ROLES[str(m.get("role", "")).lower()], str(m["content"] or "")) for m in msgs]
        except KeyError:
            log.skip("malformed item", where, "unknown role")
            continue
        images = tuple(os.path.join(image_dir, p) for p in item.get("images", []))
        rid = str(item.get("id", os.path.splitext(os.path.basename(images[0]))[0] if images else i))
        parsed.append((i, f"{where} id={rid}", tuple(turns), rid, images))
    records = []
    for i, where, turns, rid, images in _to_model_scale(path, parsed, box_format):
        if _check(turns, images, where, log, check_images):
            records.append(Record(rid, images, turns, modality_of(images[0]) if images else "text", where, i))
    return records
