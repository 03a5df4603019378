"""Qwen2-VL image preprocessing against transformers' processor, and image/DICOM loading.

Tolerance 1e-5 on normalised pixel values (range about -1.8..2.2): both sides do the same bicubic PIL
resize on uint8 and differ only in float rounding of rescale/normalise (observed ~5e-7)."""

import types

import numpy as np
import pydicom  # noqa: E402
import pytest
from PIL import Image
from pydicom.data import get_testdata_file  # noqa: E402

from clinkd_jax.data import image as I
from clinkd_jax.models.presets import qwen3_vl_2b

CASES = [((100, 120), (56 * 56, 112 * 112)), ((333, 517), (56 * 56, 28 * 28 * 1280)),
         ((40, 30), (256 * 256, 512 * 512)),
         ((1024, 700), (512 * 512, 768 * 768)), ((57, 913), (56 * 56, 224 * 224))]


@pytest.mark.parametrize("size, budget", CASES)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_matches_transformers_processor(size, budget, mode):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(sum(size))
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    img = Image.fromarray(rng.integers(0, 256, (*size, channels), dtype=np.uint8).squeeze(), mode)
    ref = Qwen2VLImageProcessorPil(min_pixels=budget[0], max_pixels=budget[1])(img, return_tensors="np")
    patches, grid = I.preprocess(img, I.ImageConfig(min_pixels=budget[0], max_pixels=budget[1]))
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-5, rtol=0)
    assert I.num_patches(*size, I.ImageConfig(min_pixels=budget[0], max_pixels=budget[1])) == len(patches)


def test_qwen25_vl_processing_is_the_same():
    """Qwen2.5-VL's processing as transformers does it: the auto mapping gives model_type qwen2_5_vl the Qwen2-VL
    image processor (so the parity test above covers it; a transformers change there fails here), and
    Qwen2_5_VLProcessor writes grid / merge_size² <|image_pad|> tokens per image, the count our encoder expands
    each image to. Checked at Qwen2.5-VL's published settings (patch 14, merge 2, 3136..12845056 pixels)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES as mapping
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    assert mapping["qwen2_5_vl"] == mapping["qwen2_vl"]
    cfg = I.ImageConfig(min_pixels=3136, max_pixels=12845056)
    ref_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    # the processor's token rule alone: building the whole processor needs a video processor (torchvision)
    processor = types.SimpleNamespace(image_processor=ref_processor, image_token="<|image_pad|>")
    rng = np.random.default_rng(1)
    for size in ((100, 120), (333, 517), (1024, 700), (57, 913)):
        img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        ref = ref_processor(img, return_tensors="np")
        patches, grid = I.preprocess(img, cfg)
        np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-5, rtol=0)
        pads = Qwen2_5_VLProcessor.replace_image_token(processor, ref, 0)
        assert pads.count("<|image_pad|>") == I.num_patches(*size, cfg) // cfg.merge_size ** 2 == len(patches) // 4


@pytest.mark.parametrize("size", [(100, 120), (333, 517), (57, 913)])
def test_qwen3_vl_processing(size):
    """Qwen3-VL's: transformers' Qwen2-VL image processor with Qwen3-VL's published settings (16 px patches,
    mean = std = 0.5, 256² .. 4096² pixels), against ours as `for_model` sets it up for a Qwen3-VL config."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES as mapping
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    assert mapping["qwen3_vl"] == mapping["qwen2_vl"]
    cfg = I.for_model(qwen3_vl_2b(), 256 * 256, 4096 * 4096)
    ref = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    want = ref(img, return_tensors="np")
    patches, grid = I.preprocess(img, cfg)
    assert [list(grid)] == want["image_grid_thw"].tolist() and patches.shape[1] == cfg.patch_dim == 1536
    np.testing.assert_allclose(patches, want["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    for h, w in rng.integers(20, 3000, (200, 2)):
        for lo, hi in ((56 * 56, 768 * 768), (512 * 512, 1024 * 1024)):
            if max(h, w) / min(h, w) <= 200:
                assert I.smart_resize(int(h), int(w), 28, lo, hi) == smart_resize(int(h), int(w), 28, lo, hi)
    with pytest.raises(I.ImageError, match="aspect ratio 250 is above 200"):
        I.smart_resize(10, 2500)


def test_window():
    x = np.array([-1000, 0, 40, 90, 1000], np.float32)
    # DICOM linear window, center 40 / width 100: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] = [-10, 89] -> 0..255
    assert I.window_to_uint8(x, center=40, width=100).tolist() == [0, 26, 129, 255, 255]
    ramp = np.arange(1000, dtype=np.float32)
    out = I.window_to_uint8(ramp)  # no stored window: 1st..99th percentile
    assert out[5] == 0 and out[995] == 255 and 120 < out[500] < 135


def test_dicom_ct_mr_xray_us_multiframe():
    ct = I.load_image(get_testdata_file("CT_small.dcm"))  # no window stored: percentile window
    mr = I.load_image(get_testdata_file("MR_small.dcm"))  # stored window 600/1600
    assert ct.mode == "L" and ct.size == (128, 128) and 0 < np.asarray(ct).mean() < 255
    assert mr.size == (64, 64)
    us = I.load_image(get_testdata_file("examples_rgb_color.dcm"))
    assert us.mode == "RGB" and us.size == (320, 240)
    multi = I.load_dicom(get_testdata_file("emri_small.dcm"))  # 10 frames: the middle one
    assert multi.size == (64, 64)
    patches, grid = I.preprocess(ct, I.ImageConfig(max_pixels=112 * 112))
    assert grid == (1, 8, 8) and patches.shape == (64, 1176)


def test_monochrome1_is_inverted():
    """MONOCHROME1 stores bright as low values; after loading, bone must be bright as in MONOCHROME2."""
    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.fail("pydicom-data is part of the test install (RG1_UNCI.dcm missing)")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = np.asarray(I.load_dicom(path), np.float32)
    raw = ds.pixel_array.astype(np.float32)
    assert np.corrcoef(img.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.5


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(I.ImageError, match="nope.png: image file not found"):
        I.load_image(str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(I.ImageError, match="bad.png: cannot decode image"):
        I.load_image(str(tmp_path / "bad.png"))
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 200)
    with pytest.raises(I.ImageError, match="bad.dcm: cannot decode DICOM"):
        I.load_image(str(tmp_path / "bad.dcm"))


def test_dicom_without_pixel_data_and_a_given_window(tmp_path):
    """A DICOM that holds no image (a report, a structured set) is named as such, header read or decoded; a
    (center, width) window given by the caller replaces the file's own VOI window."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    del ds.Rows
    ds.save_as(tmp_path / "report.dcm")
    for read in (I.load_image, I.image_size):
        with pytest.raises(I.ImageError, match="report.dcm: a DICOM file without"):
            read(str(tmp_path / "report.dcm"))
    path = get_testdata_file("CT_small.dcm")
    hu = pydicom.dcmread(path).pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    narrow = np.asarray(I.load_dicom(path, window=(40.0, 80.0)), np.float32)
    np.testing.assert_array_equal(narrow, I.window_to_uint8(hu, 40.0, 80.0))
    assert not np.array_equal(narrow, np.asarray(I.load_dicom(path), np.float32))


def test_nan_or_inf_pixels_are_an_image_error(tmp_path):
    """Float images can hold NaN or Inf (a 32-bit TIFF, a float array from a data set, a DICOM whose rescale
    overflows); windowing would make them arbitrary grey levels, so the file is refused by name (the pipeline
    counts it as an unreadable image, or stops under data.strict)."""
    x = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    x[3, 5] = np.nan
    Image.fromarray(x, mode="F").save(tmp_path / "float.tif")
    with pytest.raises(I.ImageError, match=r"float.tif: 1 of 4096 pixel values are NaN or Inf"):
        I.load_image(str(tmp_path / "float.tif"))
    x[3, 5] = np.inf
    with pytest.raises(I.ImageError, match="in-memory image: 1 of 4096"):
        I.load_image(x)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope = "1e39"  # beyond float32: every value overflows to Inf
    ds.save_as(tmp_path / "overflow.dcm")
    with pytest.raises(I.ImageError, match="overflow.dcm: 16384 of 16384 pixel values are NaN or Inf"):
        I.load_image(str(tmp_path / "overflow.dcm"))
    x[3, 5] = 0.5  # finite float images still load
    assert I.load_image(x).size == (64, 64)
