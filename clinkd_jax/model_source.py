"""Where a model comes from, as one value: a Hugging Face directory, a clinkd_jax params checkpoint, or a preset
built from scratch. A `ModelSource` answers what every command asks of a model: its geometry (with a checkpoint's
processor settings), its parameters, the tokenizer it carries and what it is (for reports and stamps).

Built from a config section (`model`, `teacher`) by `ModelSource.of`, from a folder a user names (predict, serve)
by `ModelSource.find`, and written back into a config section by `ModelSource.put` (a recipe's chained stage).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax

from clinkd_jax import checkpoint, hf_checkpoint
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import processor, text
from clinkd_jax.data import vocab as vocab_lib
from clinkd_jax.models import config as model_config
from clinkd_jax.models import presets
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.qwen2vl import Qwen2VL, init_params

log = logging.getLogger("clinkd_jax.setup")
KINDS = ("hf_dir", "orbax_dir", "preset")  # the fields of a config section that name a source; one is given


def _items(overrides) -> tuple:
    """A config's overrides as sorted (field, value) pairs, lists as tuples (a hashable, comparable value)."""
    d = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    section: str  # the config section it was read from ("model", "teacher"): named in every message
    kind: str  # one of KINDS
    where: str  # the directory, or the preset's name
    family: str = ""  # a preset's family (a checkpoint's must agree with its own)
    text_overrides: tuple = ()  # a preset's (field, value) changes to the LLM / the vision tower
    vision_overrides: tuple = ()

    @classmethod
    def of(cls, c, section: str, required: bool = True) -> ModelSource | None:
        """config.<section>'s source, its settings checked (no file read); None if it names none and none is
        `required`."""
        src = c[section]
        given = [k for k in KINDS if src[k]]
        if len(given) > 1:
            raise ConfigError(f"{section}: give exactly one of hf_dir / orbax_dir / preset, got "
                              f"{', '.join(f'{section}.{g}' for g in given)}")
        if not given:
            if required:
                raise ConfigError(f"{section}: no source; set {section}.hf_dir, {section}.orbax_dir or "
                                  f"{section}.preset")
            return None
        if src.preset and src.preset not in presets.PRESETS:
            raise ConfigError(f"{section}.preset={src.preset!r} is not one of {sorted(presets.PRESETS)}")
        family = src.get("family", "")
        if family and family not in model_config.FAMILIES:
            raise ConfigError(f"{section}.family={family!r} is not one of {sorted(model_config.FAMILIES)}")
        for part, kind in (("text", model_config.TextConfig), ("vision", model_config.VisionConfig)):
            overrides = src.get(f"{part}_overrides")
            if overrides and not src.preset:  # a checkpoint's geometry is its own
                raise ConfigError(f"{section}.{part}_overrides apply to a preset only, not to {section}.{given[0]}")
            unknown = sorted(set(overrides or ()) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                raise ConfigError(f"{section}.{part}_overrides: {unknown} are not {kind.__name__} fields")
        return cls(section, given[0], src[given[0]], family, _items(src.get("text_overrides")),
                   _items(src.get("vision_overrides")))

    @classmethod
    def find(cls, path: str, flag: str = "--model") -> ModelSource:
        """The checkpoint `path` names: a Hugging Face directory, a params directory, or a run's stage folder
        holding one (its params/, else its export_hf/)."""
        if not os.path.isdir(path):
            raise checkpoint.CheckpointError(f"{flag}={path}: no such directory")
        for sub in ("", "params", "export_hf"):
            d = os.path.join(path, sub) if sub else path
            if os.path.isfile(os.path.join(d, checkpoint.CONFIG_FILE)):
                return cls("model", "orbax_dir", d)
            if os.path.isfile(os.path.join(d, "config.json")):
                return cls("model", "hf_dir", d)
        raise checkpoint.CheckpointError(f"{flag}={path}: neither a Hugging Face model directory (config.json) nor "
                                         f"a clinkd_jax params directory ({checkpoint.CONFIG_FILE}), nor a run's "
                                         "stage folder holding one (params/, export_hf/)")

    def put(self, node) -> None:
        """Make config section `node` name this source (and nothing else of a source's)."""
        for k in KINDS:
            node[k] = ""
        node[self.kind] = self.where
        if self.kind == "preset":  # a checkpoint's family stays as set: a check that it is what is expected
            node.family = self.family
        for part in ("text", "vision"):
            node[f"{part}_overrides"] = type(node)(dict(getattr(self, f"{part}_overrides")))

    def check_files(self) -> None:
        if self.kind != "preset" and not os.path.isdir(self.where):
            raise ConfigError(f"{self.section}.{self.kind}={self.where!r} is not a directory")

    @property
    def checkpoint(self) -> str:
        """The checkpoint's directory ("" for a preset)."""
        return "" if self.kind == "preset" else self.where

    @property
    def assets(self) -> str:
        """The folder of the Hugging Face files (tokenizer, generation_config) a checkpoint carries ("": none)."""
        if self.kind == "orbax_dir":
            return os.path.join(self.where, checkpoint.ASSETS_DIR)
        return self.where if self.kind == "hf_dir" else ""

    def describe(self) -> str:
        return f"preset {self.where}" if self.kind == "preset" else self.where

    def geometry(self, vocab_ids=None) -> model_config.Qwen2VLConfig:
        """The model's geometry (a checkpoint's with its processor settings; a preset's with the family's vision
        tower, the overrides and the compact vocabulary `vocab_ids`); no weights read."""
        if self.kind == "preset":
            return self._preset(vocab_ids)
        cfg = (processor.read(self.where, model_config.Qwen2VLConfig.from_hf_dir(self.where))
               if self.kind == "hf_dir" else checkpoint.load_config(self.where))
        if self.family and self.family != cfg.family:
            raise ConfigError(f"{self.where} holds a {cfg.family} model, but its family is set to {self.family!r}; "
                              "a checkpoint's family is its own (unset the family field)")
        note = checkpoint_decoding(self.assets)
        if note and note not in _SAID:  # once per run, however often the geometry is asked for
            _SAID.add(note)
            log.info(note)
        return cfg

    def _preset(self, vocab_ids) -> model_config.Qwen2VLConfig:
        cfg = presets.PRESETS[self.where]()
        for part in ("text", "vision"):  # the LLM's sizes before the family (Qwen3-VL's DeepStack fits its depth),
            overrides = dict(getattr(self, f"{part}_overrides"))  # the tower's after (the family's own fields)
            if overrides:
                cfg = cfg.replace(**{part: dataclasses.replace(getattr(cfg, part), **overrides)})
            if self.family and part == "text":
                cfg = model_config.as_family(cfg, self.family)
        return cfg if vocab_ids is None else vocab_lib.compact_config(cfg, vocab_ids)

    def load(self, mesh, rules, seed: int, vocab_ids=None, dtype: str | None = None):
        """(geometry, params on their shards); a preset's are random (seeded). `dtype`: the parameters' dtype
        (None: a checkpoint's own, float32 for a preset)."""
        cfg = self.geometry(vocab_ids)  # the geometry (and its family checked) before any weight is read
        if self.kind == "hf_dir":
            return hf_checkpoint.load_hf_checkpoint(self.where, config=cfg, mesh=mesh, rules=rules, dtype=dtype)
        if self.kind == "orbax_dir":
            return checkpoint.load_params(self.where, mesh=mesh, rules=rules, dtype=dtype)
        return cfg, init_params(Qwen2VL(cfg, param_dtype=dtype or "float32"), jax.random.key(seed), mesh, rules)

    def tokenizer_file(self) -> str | None:
        """The tokenizer.json it carries (None for a preset, or none saved)."""
        f = os.path.join(self.assets, "tokenizer.json") if self.assets else ""
        return f if f and os.path.isfile(f) else None


def names_a_source(node) -> bool:
    """Whether config section (or stage-settings section) `node` sets one of the fields that name a source."""
    return any(node.get(k) for k in KINDS)


def tokenizer_dir(c) -> str:
    """data.tokenizer, else the model's HF directory, else the tokenizer files saved with an Orbax params
    checkpoint (hf_assets/), else (a preset, built from scratch) the bundled Qwen2 tokenizer. A checkpoint
    without its tokenizer is an error: another tokenizer would silently mis-map every id."""
    for field, d in (("data.tokenizer", c.data.tokenizer), ("model.hf_dir", c.model.hf_dir)):
        if d and not any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "vocab.json")):
            raise ConfigError(f"{field}={d!r} holds no tokenizer (tokenizer.json or vocab.json)"
                              + ("; set data.tokenizer to the model's tokenizer" if field == "model.hf_dir" else ""))
        if d:
            return d
    if c.model.orbax_dir:
        assets = os.path.join(c.model.orbax_dir, checkpoint.ASSETS_DIR)
        if not os.path.isfile(os.path.join(assets, "tokenizer.json")):
            raise ConfigError(f"model.orbax_dir={c.model.orbax_dir!r} holds no tokenizer ({checkpoint.ASSETS_DIR}/"
                              "tokenizer.json); set data.tokenizer to the tokenizer it was trained with")
        return assets
    return text.bundled_qwen2_tokenizer_dir()


def same_tokenizer(model: ModelSource, other: ModelSource | None, what: str) -> None:
    """`other` (a teacher, a corrector) encodes text as the model does: where both checkpoints carry a
    tokenizer, their vocabularies and added tokens are the same (Qwen2-VL and Qwen2.5-VL share one)."""
    found = [model.tokenizer_file(), other.tokenizer_file() if other else None]
    if None in found:
        return
    tables = []
    for f in found:
        with open(f) as fh:
            tok = json.load(fh)
        tables.append(((tok.get("model") or {}).get("vocab"), [(t.get("id"), t.get("content"))
                                                              for t in tok.get("added_tokens") or ()]))
    if tables[0] != tables[1]:
        raise ConfigError(f"{what}: its tokenizer ({found[1]}) is not the model's ({found[0]}): token ids would mean "
                          "different text; distil between models of one tokenizer")


SPECIAL_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id",
               "eos_token_id")


def same_inputs(cfg, other, what: str) -> None:
    """One batch means the same to both models (a teacher or corrector reads the student's): the same (full or
    compact) token rows and special ids, and the same image processing (patch geometry, normalisation). Vocabulary
    sizes may differ by padding rows (Qwen2.5-VL-7B 152064 vs 3B 151936): losses cut to the student's."""
    mine, theirs = image_lib.for_model(cfg, 1, 1), image_lib.for_model(other, 1, 1)  # the run's budget is theirs
    if mine != theirs:
        raise ConfigError(f"{what} ({other.family}: {theirs.patch_size} px patches, mean {theirs.mean}) reads images "
                          f"differently from the model ({cfg.family}: {mine.patch_size} px patches, mean {mine.mean}): "
                          "they cannot share a batch; pick a teacher of the same image processing")
    if cfg.vocab_ids != other.vocab_ids:
        def n(x):
            return "the full vocabulary" if x.vocab_ids is None else f"a compact vocabulary of {len(x.vocab_ids)} ids"

        raise ConfigError(f"{what} has {n(other)} but the model has {n(cfg)}: token ids would not line up")
    for key in SPECIAL_IDS:
        if getattr(cfg, key) != getattr(other, key):
            raise ConfigError(f"{what} has {key}={getattr(other, key)} but the model has {getattr(cfg, key)}: "
                              "a different tokenizer; its logits would not line up with the model's tokens")


# generation_config.json fields and the value at which they change nothing (greedy, no penalty)
_NEUTRAL = {"do_sample": False, "repetition_penalty": 1.0, "num_beams": 1, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
_SAID: set[str] = set()


def checkpoint_decoding(folder: str) -> str:
    """What a checkpoint's generation_config.json asks that decoding here does not do, as one log line ("" if
    nothing): decoding follows the run's settings (eval.temperature / top_p: greedy for the ClinKD protocol, which
    the released scripts approach with Qwen2-VL-Instruct's near-greedy file), and stops at the tokenizer's
    end-of-turn and end-of-text tokens."""
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return ""
    asked = {k: d[k] for k in _NEUTRAL if k in d and d[k] not in (None, _NEUTRAL[k])}
    if d.get("do_sample"):
        asked.update({k: d[k] for k in ("temperature", "top_p", "top_k") if k in d})
    if not asked:
        return ""
    return (f"{path}: not applied: {', '.join(f'{k}={v}' for k, v in asked.items())} (decoding follows the run's "
            "eval.temperature / eval.top_p; no repetition penalty or beam search here; docs/models.md)")
