"""A checkpoint's image processor settings (`preprocessor_config.json`): what transformers' Qwen2-VL image processor
feeds the model, so that we feed it the same pixels.

Read from a Hugging Face directory (and from a params checkpoint's `hf_assets/`): `image_mean`, `image_std` (the
normalisation), `patch_size`, `temporal_patch_size`, `merge_size` (checked against `config.json`'s vision tower: a
conflict is refused by name, since the weights fix the geometry), and the pixel budget (`min_pixels` / `max_pixels`,
or `size.shortest_edge` / `size.longest_edge` as newer transformers write it; the top-level keys win, as in
transformers). Without the file, the family's published values (`FAMILY_DEFAULTS`). The values ride on the model's
config (`Qwen2VLConfig.image_mean` ...) and are written back beside every params checkpoint and export (`write`).
Switches our preprocessing has one value of (`do_normalize`, `resample`, `rescale_factor`, ...) are refused with
another value. Which budget a run uses: docs/models.md.
"""

from __future__ import annotations

import json
import math
import os

from clinkd_jax import files
from clinkd_jax.errors import UserError

FILE = "preprocessor_config.json"


class ConfigError(UserError):
    """A processor file that cannot be honoured (a geometry that contradicts the weights, an unsupported switch)."""


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# each family's published processor: normalisation and pixel budget (min, max pixels)
FAMILY_DEFAULTS = {
    "qwen2_vl": {"mean": CLIP_MEAN, "std": CLIP_STD, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384,
                 "processor_class": "Qwen2VLProcessor", "image_processor_type": "Qwen2VLImageProcessor"},
    "qwen2_5_vl": {"mean": CLIP_MEAN, "std": CLIP_STD, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384,
                   "processor_class": "Qwen2_5_VLProcessor", "image_processor_type": "Qwen2VLImageProcessor"},
    "qwen3_vl": {"mean": HALF, "std": HALF, "min_pixels": 65536, "max_pixels": 16777216,
                 "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"},
}
_GEOMETRY = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
             ("merge_size", "spatial_merge_size"))
# switches our preprocessing has one value of (transformers' default): another value is refused, never ignored
_FIXED = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
          "rescale_factor": 1 / 255}


def normalisation(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's pixels are normalised with: its checkpoint's, else its family's."""
    d = FAMILY_DEFAULTS[cfg.family]
    return cfg.image_mean or d["mean"], cfg.image_std or d["std"]


def budget(cfg) -> tuple[int, int]:
    """(min, max) pixels the model's checkpoint was published to be asked with, else its family's."""
    d = FAMILY_DEFAULTS[cfg.family]
    return cfg.min_pixels or d["min_pixels"], cfg.max_pixels or d["max_pixels"]


def _triple(d: dict, key: str, where: str) -> tuple[float, float, float] | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3  # transformers accepts one value for the three channels
    if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         and math.isfinite(x) for x in v)):
        raise ConfigError(f"{where}: {key} must be three numbers (one per RGB channel), got {v!r}")
    if key == "image_std" and min(v) <= 0:
        raise ConfigError(f"{where}: image_std {v} must be positive")
    return tuple(float(x) for x in v)


def _pixels(d: dict, where: str) -> tuple[int, int]:
    size = d.get("size") if isinstance(d.get("size"), dict) else {}
    lo = d.get("min_pixels", size.get("min_pixels", size.get("shortest_edge")))
    hi = d.get("max_pixels", size.get("max_pixels", size.get("longest_edge")))
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"{where}: {name} (or size) must be a positive whole number of pixels, got {v!r}")
    if lo and hi and lo > hi:
        raise ConfigError(f"{where}: min_pixels {lo} is above max_pixels {hi}")
    return lo or 0, hi or 0


def read(folder: str, cfg) -> object:
    """`cfg` with the settings of `folder`'s preprocessor_config.json (unchanged without one)."""
    where = os.path.join(folder, FILE)
    if not os.path.isfile(where):
        return cfg
    try:
        with open(where, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    for key, fixed in _FIXED.items():
        if key in d and not (d[key] == fixed or (key == "rescale_factor" and isinstance(d[key], float)
                                                 and math.isclose(d[key], fixed))):
            raise ConfigError(f"{where}: {key} is {d[key]!r}; clinkd_jax preprocesses images with {key} = {fixed!r} "
                              "only (transformers' default), so it cannot feed this model what its processor would")
    for key, ours in _GEOMETRY:
        if key in d and d[key] != getattr(cfg.vision, ours):
            raise ConfigError(f"{where}: {key} is {d[key]!r} but the model's config.json has vision_config.{ours} = "
                              f"{getattr(cfg.vision, ours)}; the weights fix the geometry: correct the processor file")
    lo, hi = _pixels(d, where)
    return cfg.replace(image_mean=_triple(d, "image_mean", where), image_std=_triple(d, "image_std", where),
                       min_pixels=lo, max_pixels=hi)


def write(folder: str, cfg) -> str | None:
    """preprocessor_config.json in `folder` saying how `cfg`'s pixels are made (a copied file is updated, keeping
    what else it holds); None when `cfg` has no settings of its own and there is no file to update."""
    where = os.path.join(folder, FILE)
    if cfg.image_mean is None and cfg.image_std is None and not cfg.min_pixels and not cfg.max_pixels \
            and not os.path.isfile(where):
        return None  # the family's defaults: nothing to say
    d = files.read_json(where, {}) if os.path.isfile(where) else {}
    defaults = FAMILY_DEFAULTS[cfg.family]
    d.setdefault("image_processor_type", defaults["image_processor_type"])
    d.setdefault("processor_class", defaults["processor_class"])
    mean, std = normalisation(cfg)
    lo, hi = budget(cfg)
    d.update(image_mean=list(mean), image_std=list(std), patch_size=cfg.vision.patch_size,
             temporal_patch_size=cfg.vision.temporal_patch_size, merge_size=cfg.vision.spatial_merge_size,
             min_pixels=lo, max_pixels=hi, size={"shortest_edge": lo, "longest_edge": hi})
    d.setdefault("do_resize", True)
    d.setdefault("do_rescale", True)
    d.setdefault("do_normalize", True)
    d.setdefault("do_convert_rgb", True)
    return files.write_json(where, d)
