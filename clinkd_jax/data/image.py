"""Qwen2-VL image preprocessing in NumPy/PIL (equal to transformers' Qwen2VLImageProcessor, PIL backend),
and image loading for PNG/JPEG (grayscale and RGBA converted) and DICOM (windowed to 8 bits).

    image -> RGB uint8 -> smart_resize (multiples of 28, pixel budget) -> bicubic resize -> /255
          -> CLIP mean/std -> duplicate to 2 frames -> patches (N, 3*2*14*14) in merge-window order
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from PIL import Image

from clinkd_jax.data import processor
from clinkd_jax.data.processor import CLIP_MEAN, CLIP_STD
from clinkd_jax.errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageError(UserError):
    """An image that cannot be read or used."""

    kind = "data"


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Pixel budget, patch geometry and normalisation. Training (ClinKD: <= 768^2 px) and evaluation
    (512^2 - 1024^2) use different budgets (clinkd-spec §2.6); `for_model` takes the rest from the model."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch (3 x temporal x patch x patch), the model's `VisionConfig.patch_dim`."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def for_model(model_cfg, min_pixels: int, max_pixels: int) -> ImageConfig:
    """The image processing a model of this config was trained with: its patch and merge geometry, its
    checkpoint's normalisation (else its family's: `data.processor`), and the run's pixel budget (0: the
    checkpoint's, else the family's)."""
    v = model_cfg.vision
    mean, std = processor.normalisation(model_cfg)
    lo, hi = processor.budget(model_cfg)
    min_pixels, max_pixels = min_pixels or lo, max_pixels or hi
    return ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=v.patch_size,
                       temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size, mean=mean, std=std)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280):
    """(h, w) divisible by `factor`, with h*w in [min_pixels, max_pixels], aspect ratio kept as well as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is composited over white (as transformers' convert_to_rgb does)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I", "F"):
        return Image.fromarray(window_to_uint8(np.asarray(img, np.float32))).convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, cfg: ImageConfig = ImageConfig()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB image -> (patches (grid_h*grid_w, 3*T*P*P) float32 in merge-window order, grid (1, grid_h, grid_w))."""
    img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.BICUBIC)
    x = np.asarray(img, np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    x = (x - np.asarray(cfg.mean, np.float32)[:, None, None]) / np.asarray(cfg.std, np.float32)[:, None, None]
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # windows, in-window, C, P, P
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image is t identical frames
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * t * p * p)), (1, gh, gw)


def seen_size(path, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(height, width) of the image as the model sees it (resized by `preprocess`), from the header only."""
    return smart_resize(*image_size(path), cfg.factor, cfg.min_pixels, cfg.max_pixels)


def grid_size(grid, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(height, width) in pixels of a preprocessed image's (t, h, w) patch grid."""
    return int(grid[1]) * cfg.patch_size, int(grid[2]) * cfg.patch_size


def num_patches(height: int, width: int, cfg: ImageConfig = ImageConfig()) -> int:
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return (h // cfg.patch_size) * (w // cfg.patch_size)


# ----------------------------------------------------------------------------------------- loading
def window_to_uint8(x: np.ndarray, center: float | None = None, width: float | None = None) -> np.ndarray:
    """Window an intensity image to uint8. Without a stored window: the robust 1st-99th percentile range."""
    x = x.astype(np.float32)
    if center is None or width is None or width <= 0:
        lo, hi = np.percentile(x, [1, 99])
        if hi <= lo:
            lo, hi = float(x.min()), float(x.max()) + 1e-6
    else:  # DICOM PS3.3 C.11.2.1.2 linear window
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return (np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)


def _first(value):
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def load_dicom(path: str, window: tuple[float, float] | None = None) -> Image.Image:
    """A DICOM slice as an 8-bit image: rescale slope/intercept, the stored VOI window (or a percentile
    window; `window` = (center, width) overrides both), MONOCHROME1 inverted; colour images are kept as RGB;
    for multi-frame files the middle frame."""
    import pydicom  # optional dependency: only needed for DICOM input

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for damaged or unsupported files
        raise ImageError(f"{path}: cannot decode DICOM ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{path}: a DICOM file without pixel data (a report or structured set, not an image)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for damaged or unsupported files
        raise ImageError(f"{path}: cannot decode DICOM ({type(e).__name__}: {e})") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if str(getattr(ds, "PhotometricInterpretation", "RGB")).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
        return Image.fromarray(np.asarray(arr, np.uint8), "RGB")
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by `finite`, naming the file
        x = finite(np.asarray(arr.astype(np.float32) * slope + intercept, np.float32), path)
    center, width = window or (_first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None)))
    out = window_to_uint8(x, center, width)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, "L")


def finite(x: np.ndarray, path) -> np.ndarray:
    """`x`, or an ImageError saying how many of its values are NaN or Inf (float DICOM, TIFF or arrays can hold
    them; windowing would turn them into arbitrary grey levels)."""
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ImageError(f"{path if isinstance(path, str) else 'an in-memory image'}: {bad} of {x.size} pixel "
                         "values are NaN or Inf")
    return x


def load_image(path, window: tuple[float, float] | None = None) -> Image.Image:
    """PNG/JPEG/... through PIL, DICOM through pydicom (`window`: `load_dicom`'s); raises ImageError naming the
    file.

    Already-decoded images (a PIL image or an (H, W[, C]) uint8 array, e.g. from the TFDS source) pass through.
    """
    if isinstance(path, Image.Image):
        return path
    if isinstance(path, np.ndarray):
        return Image.fromarray(finite(path, path) if path.dtype.kind == "f" else path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: image file not found")
    if path.lower().endswith(DICOM_SUFFIXES):
        return load_dicom(path, window)
    try:
        with Image.open(path) as img:
            img.load()
            img = img.copy()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    if img.mode == "F":  # 32-bit float (TIFF): the only PIL mode that holds NaN or Inf
        finite(np.asarray(img), path)
    return img


def image_size(path) -> tuple[int, int]:
    """(height, width) of the image `load_image` would return, read from the file header only (no pixel
    decoding): what the input pipeline plans batches with. Raises ImageError naming the file."""
    if isinstance(path, Image.Image):
        return path.height, path.width
    if isinstance(path, np.ndarray):
        return int(path.shape[0]), int(path.shape[1])
    if not os.path.isfile(path):
        raise ImageError(f"{path}: image file not found")
    try:
        if path.lower().endswith(DICOM_SUFFIXES):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise ImageError(f"{path}: a DICOM file without an image (no Rows/Columns; a report or "
                                 "structured set?)")
            return int(ds.Rows), int(ds.Columns)  # every frame (load_dicom takes the middle one) has this size
        with Image.open(path) as img:
            return img.height, img.width
    except ImageError:
        raise
    except Exception as e:  # PIL / pydicom raise many types for damaged files
        raise ImageError(f"{path}: cannot read the image header ({type(e).__name__}: {e})") from None
