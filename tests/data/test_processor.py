"""A checkpoint's preprocessor_config.json (clinkd_jax.data.processor): read onto the model's config, used by the
image processing, refused where it contradicts the weights or asks for processing we do not do, and carried along
by every save and export. Parity with transformers' processor and model through the evaluation command is in
tests/test_processor_parity.py."""

import json
import shutil

import pytest

from clinkd_jax import checkpoint, hf_checkpoint
from clinkd_jax.data import image as image_lib
from clinkd_jax.data import processor
from clinkd_jax.models import presets

CUSTOM = {"image_mean": [0.2, 0.3, 0.4], "image_std": [0.1, 0.2, 0.25], "patch_size": 14, "temporal_patch_size": 2,
          "merge_size": 2, "size": {"shortest_edge": 64 * 64, "longest_edge": 224 * 224}, "do_normalize": True,
          "image_processor_type": "Qwen2VLImageProcessor", "custom_key": "kept"}


def folder_with(tmp_path, d):
    (tmp_path / processor.FILE).write_text(json.dumps(d))
    return str(tmp_path)


def test_settings_are_read_and_used(tmp_path):
    cfg = presets.PRESETS["tiny_qwen"]()
    plain = image_lib.for_model(cfg, 0, 0)
    assert (plain.mean, plain.min_pixels, plain.max_pixels) == (processor.CLIP_MEAN, 56 * 56, 28 * 28 * 16384)
    assert processor.read(str(tmp_path), cfg) == cfg  # no file: the family's published values
    read = processor.read(folder_with(tmp_path, CUSTOM), cfg)
    ours = image_lib.for_model(read, 0, 0)
    assert (ours.mean, ours.std, ours.min_pixels, ours.max_pixels) == ((0.2, 0.3, 0.4), (0.1, 0.2, 0.25), 4096, 50176)
    assert image_lib.for_model(read, 32 * 32, 768 * 768).max_pixels == 768 * 768  # a run's budget wins
    legacy = processor.read(folder_with(tmp_path, {**CUSTOM, "min_pixels": 3136, "max_pixels": 100352}), cfg)
    assert (legacy.min_pixels, legacy.max_pixels) == (3136, 100352)  # top-level keys win over size, as in HF


@pytest.mark.parametrize("change, message", [
    ({"patch_size": 16}, "patch_size is 16 but the model's config.json has vision_config.patch_size = 14"),
    ({"merge_size": 4}, "merge_size is 4 but"),
    ({"do_normalize": False}, "do_normalize is False; clinkd_jax preprocesses images with do_normalize = True"),
    ({"resample": 2}, "resample is 2"),
    ({"rescale_factor": 1 / 127.5}, "rescale_factor is"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be three numbers"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std .* must be positive"),
    ({"size": {"shortest_edge": 1000, "longest_edge": 10}}, "min_pixels 1000 is above max_pixels 10"),
    ({"max_pixels": "lots"}, "max_pixels .* must be a positive whole number"),
])
def test_a_file_we_cannot_honour_is_refused_by_name(tmp_path, change, message):
    cfg = presets.PRESETS["tiny_qwen"]()
    with pytest.raises(processor.ConfigError, match=f"{processor.FILE}: {message}"):
        processor.read(folder_with(tmp_path, {**CUSTOM, **change}), cfg)
    (tmp_path / processor.FILE).write_text("{oops")
    with pytest.raises(processor.ConfigError, match="not valid JSON"):
        processor.read(str(tmp_path), cfg)


def test_settings_travel_with_params_and_exports(tmp_path):
    """HF directory with its own processor -> params checkpoint -> export: the same settings at every step, the
    file's other keys kept; a model without settings of its own writes none."""
    from clinkd_jax.model_source import ModelSource

    src = tmp_path / "hf"
    shutil.copytree("tests/golden/gqa2_untied", src)
    folder_with(src, {**CUSTOM, "patch_size": json.load(open(src / "config.json"))["vision_config"]["patch_size"]})
    cfg, params = hf_checkpoint.load_hf_checkpoint(str(src))
    assert cfg.image_mean == (0.2, 0.3, 0.4) and cfg.max_pixels == 224 * 224
    checkpoint.save_params(str(tmp_path / "params"), params, cfg)
    again = checkpoint.load_config(str(tmp_path / "params"))
    assert (again.image_mean, again.image_std, again.min_pixels, again.max_pixels) == (
        cfg.image_mean, cfg.image_std, cfg.min_pixels, cfg.max_pixels)
    copied = hf_checkpoint.save_hf_checkpoint(params, again, str(tmp_path / "export"), assets_from=str(src))
    assert processor.FILE in copied
    exported = json.load(open(tmp_path / "export" / processor.FILE))
    assert exported["image_mean"] == [0.2, 0.3, 0.4] and exported["custom_key"] == "kept"
    assert processor.read(str(tmp_path / "export"), cfg) == cfg
    assert ModelSource("model", "hf_dir", str(src)).geometry() == cfg  # what a run's stages read
    assert processor.write(str(tmp_path / "none"), presets.PRESETS["tiny_qwen"]()) is None  # family defaults


def test_a_checkpoint_s_decoding_settings_are_said_when_not_applied(tmp_path):
    """generation_config.json: what would change decoding and is not done here is named in one log line (decoding
    follows the run's settings); a greedy file, or none, says nothing."""
    from clinkd_jax.model_source import checkpoint_decoding

    assert checkpoint_decoding(str(tmp_path)) == ""
    published = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                 "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}  # Qwen2-VL-Instruct's
    (tmp_path / "generation_config.json").write_text(json.dumps(published))
    note = checkpoint_decoding(str(tmp_path))
    assert "generation_config.json: not applied: do_sample=True, repetition_penalty=1.05, temperature=0.1" in note
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 151645}))
    assert checkpoint_decoding(str(tmp_path)) == ""
