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
import os
import threading

from clinkd_jax.data import markup

MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class DataError(ValueError):
    """A bad input item, named by file and item."""


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


class SkipLog:
    """Counts skipped items by reason (thread-safe) and keeps a few examples of each for the report."""

    def __init__(self, strict: bool = False, examples: int = 3):
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._keep = examples
        self._lock = threading.Lock()

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Record a skip; in strict mode raise instead."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
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
        return sum(self.counts.values())

    def report(self) -> str:
        if not self.counts:
            return "no items skipped"
        lines = [f"{self.total} item(s) skipped:"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n:6d}  {reason}" + "".join(f"\n          e.g. {e}" for e in self.examples[reason][:1]))
        return "\n".join(lines)


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


def _check(turns, images, where, log: SkipLog, check_images: bool, box_scale: int) -> bool:
    """Item-level validation shared by all readers; returns False (after logging) for a bad item."""
    if not any(t.role == "assistant" for t in turns) or any(
        t.role == "assistant" and not t.text.strip() for t in turns
    ):
        log.skip("empty or missing answer", where)
        return False
    for t in turns:
        try:
            markup.validate_boxes(t.text, box_scale)
        except markup.MarkupError as e:
            log.skip("bad box", where, str(e))
            return False
    for image in images:
        if modality_of(image) not in MODALITIES:
            log.skip("unknown modality prefix", where, f"{os.path.basename(image)!r}; known: {', '.join(MODALITIES)}")
            return False
        if check_images and not os.path.isfile(image):
            log.skip("missing image file", where, image)
            return False
    return True


def read_medgrit(
    path: str, image_dir: str, *, log: SkipLog | None = None, check_images: bool = True,
    box_scale: int = markup.BOX_SCALE, image_ext: str = ".png",
) -> list[Record]:
    """Med-GRIT / BiRD JSON, test (`[[q, a], ...]`) or training (`[{"from", "value"}, ...]`) layout."""
    log = log or SkipLog()
    records = []
    for i, item in enumerate(_load_json(path)):
        where = f"{os.path.basename(path)}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("conversations"), list):
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
        image = os.path.join(image_dir, item["id"] + image_ext)
        if _check(turns, [image], where, log, check_images, box_scale):
            records.append(Record(item["id"], (image,), tuple(turns), modality_of(image), where, i))
    return records


def read_sharegpt(
    path: str, image_dir: str, *, log: SkipLog | None = None, check_images: bool = True,
    box_scale: int = markup.BOX_SCALE,
) -> list[Record]:
    """LLaMA-Factory ShareGPT (`messages` with `role`/`content`, `images`): what ClinKD trained from."""
    log = log or SkipLog()
    records = []
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
        where = f"{where} id={rid}"
        if _check(turns, images, where, log, check_images, box_scale):
            records.append(Record(rid, images, tuple(turns), modality_of(images[0]) if images else "text", where, i))
    return records
