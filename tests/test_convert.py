"""Hugging Face checkpoint import/export, the Orbax converter CLI, and their error messages."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import reference as R
from safetensors.numpy import load_file, save_file

from clinkd_jax import checkpoint
from clinkd_jax import convert as cli
from clinkd_jax.hf_checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from clinkd_jax.models import Qwen2VL, Qwen2VLConfig
from clinkd_jax.models.config import ConfigError
from clinkd_jax.models.presets import qwen2_5_vl_3b, qwen2vl_2b, qwen3_vl_2b

SRC = f"{R.GOLDEN}/gqa2_untied"
TIED = f"{R.GOLDEN}/gqa4_tied"
Q25 = f"{R.GOLDEN}/q25_win56_gqa2"  # Qwen2.5-VL: RMSNorm without biases, gated MLP with them
Q25_TIED = f"{R.GOLDEN}/q25_win28_tied"
Q3 = f"{R.GOLDEN}/q3_ds2_gqa2"  # Qwen3-VL: model.visual / model.language_model keys, DeepStack mergers, q/k norms
Q3_TIED = f"{R.GOLDEN}/q3_ds1_tied"


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def copy_dir(tmp_path, src=SRC, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("outputs.npz"))
    return dst


def rewrite_tensors(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = fn(load_file(file))
    save_file(tensors, file, metadata={"format": "pt"})


def test_published_layout_keeps_or_casts_dtype():
    _, params = load_hf_checkpoint(SRC)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    _, bf = load_hf_checkpoint(SRC, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bf)} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(np.asarray(bf["model"]["norm"]["scale"]),
                                  np.asarray(params["model"]["norm"]["scale"]).astype(ml_dtypes.bfloat16))


def test_legacy_nested_layout_loads_the_same(tmp_path):
    """Some transformers 4.x releases saved fine-tuned models as model.language_model.* / model.visual.*."""
    d = copy_dir(tmp_path)

    def nest(t):
        out = {}
        for k, v in t.items():
            if k.startswith("model."):
                k = "model.language_model." + k[len("model."):]
            elif k.startswith("visual."):
                k = "model." + k
            out[k] = v
        return out

    rewrite_tensors(d, nest)
    assert any(k.startswith("model.language_model.layers.") for k in load_file(d / "model.safetensors"))
    leaves_equal(load_hf_checkpoint(str(d))[1], load_hf_checkpoint(SRC)[1])


@pytest.mark.parametrize("src", [SRC, TIED, Q25, Q25_TIED, Q3, Q3_TIED])
def test_export_reimport_is_exact_and_sharded_with_index(tmp_path, src):
    cfg, params = load_hf_checkpoint(src)
    out = tmp_path / "export"
    save_hf_checkpoint(params, cfg, str(out), max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    original = load_file(os.path.join(src, "model.safetensors"))
    assert set(index["weight_map"]) == set(original)  # same keys as transformers wrote, lm_head absent when tied
    cfg2, params2 = load_hf_checkpoint(str(out))
    assert cfg2 == cfg
    leaves_equal(params2, params)


def test_export_writes_the_dtype_asked_for_from_sharded_params(tmp_path):
    """Params sharded over 8 devices, exported as bfloat16 (what published checkpoints store) in several
    streamed shards: safetensors' own reader sees BF16 tensors equal to the cast parameters, config.json
    says so, and the run's chat template travels with the tokenizer files."""
    from clinkd_jax import sharding
    from clinkd_jax.models.qwen2vl import param_shardings

    cfg, params = load_hf_checkpoint(SRC)
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = jax.device_put(params, param_shardings(Qwen2VL(cfg), mesh))
    out = tmp_path / "export"
    assets = save_hf_checkpoint(sharded, cfg, str(out), dtype="bfloat16", max_shard_bytes=100_000,
                                assets_from=SRC, chat_template="{{ messages }}")
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}" and "chat_template.jinja" in assets
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = {}
    for f in sorted(set(index["weight_map"].values())):
        written.update(load_file(str(out / f)))
    original = load_file(os.path.join(SRC, "model.safetensors"))
    assert set(written) == set(original) and not list(out.glob("*.data"))  # no side files left behind
    for key, tensor in original.items():
        assert written[key].dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(written[key], tensor.astype(ml_dtypes.bfloat16), err_msg=key)


@pytest.mark.torch
@pytest.mark.parametrize("src", [SRC, TIED, Q25, Q25_TIED, Q3, Q3_TIED])
def test_load_forward_export_reload_with_transformers(tmp_path, src):
    """Published layout -> our forward -> export -> transformers.from_pretrained -> same logits."""
    cfg, params = load_hf_checkpoint(src)
    inputs, _ = R.load_golden(os.path.basename(src))
    x, _ = R.jax_inputs(inputs)
    ours = np.asarray(jax.jit(Qwen2VL(cfg).apply)({"params": params}, **x)["logits"])
    save_hf_checkpoint(params, cfg, str(tmp_path / "export"))
    reloaded = R.hf_model_class(os.path.basename(src)).from_pretrained(str(tmp_path / "export"),
                                                                       attn_implementation="eager")
    assert type(reloaded).__name__ == json.loads((tmp_path / "export" / "config.json").read_text())["architectures"][0]
    theirs = R.hf_outputs(reloaded.eval(), inputs)["logits"]
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)  # float32, see test_parity


# ---------------------------------------------------------------------------------- config.json
PUBLISHED_2B_CONFIG = {  # the layout of Qwen2-VL-2B-Instruct's config.json (flat, rope_scaling, in_chans)
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


PUBLISHED_Q25_3B_CONFIG = {  # the layout of Qwen2.5-VL-3B-Instruct's config.json
    **{k: v for k, v in PUBLISHED_2B_CONFIG.items() if k not in ("vision_config", "rope_scaling")},
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


PUBLISHED_Q3_2B_CONFIG = {  # the layout of Qwen3-VL-2B-Instruct's config.json (nested, rope_scaling in text_config)
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}


def test_config_layouts():
    assert Qwen2VLConfig.from_hf_dict(PUBLISHED_2B_CONFIG) == qwen2vl_2b()
    assert Qwen2VLConfig.from_hf_dict(PUBLISHED_Q3_2B_CONFIG) == qwen3_vl_2b()
    q3 = Qwen2VLConfig.from_hf_dir(Q3)  # as transformers 5 writes it (rope_parameters)
    assert (q3.family, q3.text.head_dim, q3.text.mrope_interleaved, q3.vision.deepstack_visual_indexes) == (
        "qwen3_vl", 32, True, (0, 2))
    assert Qwen2VLConfig.from_hf_dict(q3.to_hf_dict()) == q3
    assert Qwen2VLConfig.from_hf_dict(PUBLISHED_Q25_3B_CONFIG) == qwen2_5_vl_3b()  # the family from model_type
    q25 = Qwen2VLConfig.from_hf_dir(Q25)  # transformers 5's nested layout
    assert (q25.family, q25.vision.window_size, q25.vision.fullatt_block_indexes) == ("qwen2_5_vl", 56, (1,))
    assert Qwen2VLConfig.from_hf_dict(q25.to_hf_dict()) == q25
    nested = Qwen2VLConfig.from_hf_dir(SRC)  # transformers 5 writes text_config / rope_parameters
    assert nested.text.mrope_section == (2, 3, 3) and nested.text.num_key_value_heads == 2
    assert Qwen2VLConfig.from_hf_dict(nested.to_hf_dict()) == nested
    assert Qwen2VLConfig.from_hf_dir(TIED).text.tie_word_embeddings


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("vocab_size"), "missing field 'vocab_size'"),
        (lambda d: d.update(model_type="llava"), "model_type is 'llava'"),
        (lambda d: d["rope_scaling"].update(mrope_section=[16, 24, 16]),
         r"mrope_section=\[16, 24, 16\] must sum to head_dim/2=64"),
        (lambda d: d.update(num_key_value_heads=5), "not a multiple of num_key_value_heads=5"),
        (lambda d: d["vision_config"].update(hidden_size=3584), "must equal the LLM hidden_size=1536"),
        (lambda d: d.update(model_type="qwen3_vl_moe"), r"model_type is 'qwen3_vl_moe', expected one of "),
        (lambda d: d.update(use_sliding_window=True), "use_sliding_window is true; only full attention"),
        (lambda d: d["rope_scaling"].update(type="yarn"), "rope type 'yarn' is not supported"),
    ],
)
def test_bad_config_is_named(change, message):
    d = json.loads(json.dumps(PUBLISHED_2B_CONFIG))
    change(d)
    with pytest.raises(ConfigError, match=message):
        Qwen2VLConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: v.pop("window_size"), "missing field 'window_size'"),
        (lambda v: v.update(window_size=100), "window_size=100 must be a multiple of patch_size x spatial_merge_size"),
        (lambda v: v.update(fullatt_block_indexes=[7, 32]), r"fullatt_block_indexes \[32\] are not blocks"),
        (lambda v: v.update(out_hidden_size=3584), r"merger output \(3584\) must equal the LLM hidden_size=2048"),
    ],
)
def test_bad_qwen25_config_is_named(change, message):
    d = json.loads(json.dumps(PUBLISHED_Q25_3B_CONFIG))
    change(d["vision_config"])
    with pytest.raises(ConfigError, match=message):
        Qwen2VLConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["vision_config"].pop("num_position_embeddings"), "missing field 'num_position_embeddings'"),
        (lambda d: d["vision_config"].update(num_position_embeddings=2300), "num_position_embeddings=2300 is not a "
         "square"),
        (lambda d: d["vision_config"].update(deepstack_visual_indexes=[5, 24]),
         r"deepstack_visual_indexes \[5, 24\]: each must be a block of the depth-24 tower"),
        (lambda d: d["text_config"].update(head_dim=96), r"mrope_section=\[24, 20, 20\] must sum to head_dim/2=48"),
    ],
)
def test_bad_qwen3_config_is_named(change, message):
    d = json.loads(json.dumps(PUBLISHED_Q3_2B_CONFIG))
    change(d)
    with pytest.raises(ConfigError, match=message):
        Qwen2VLConfig.from_hf_dict(d)


# ---------------------------------------------------------------------------- bad directories
def test_missing_config(tmp_path):
    d = copy_dir(tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(ConfigError, match=f"{d}: no config.json"):
        load_hf_checkpoint(str(d))


def test_no_weights(tmp_path):
    d = copy_dir(tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no \\*.safetensors files and no model.safetensors.index.json"):
        load_hf_checkpoint(str(d))


def test_index_names_missing_shard(tmp_path):
    cfg, params = load_hf_checkpoint(SRC)
    out = tmp_path / "sharded"
    save_hf_checkpoint(params, cfg, str(out), max_shard_bytes=200_000)
    victim = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    os.remove(out / victim)
    with pytest.raises(CheckpointError, match=f"missing from {out}: {victim}"):
        load_hf_checkpoint(str(out))


def test_wrong_shape(tmp_path):
    d = copy_dir(tmp_path)
    rewrite_tensors(d, lambda t: {**t, "model.layers.1.mlp.up_proj.weight": np.zeros((96, 64), np.float32)})
    with pytest.raises(CheckpointError,
                       match=r"model.layers.1.mlp.up_proj.weight in model.safetensors has shape \(96, 64\), "
                             r"expected \(128, 64\)"):
        load_hf_checkpoint(str(d))


def test_unknown_key(tmp_path):
    d = copy_dir(tmp_path)
    rewrite_tensors(d, lambda t: {**t, "model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="1 unexpected tensor\\(s\\): model.layers.0.self_attn.extra.weight"):
        load_hf_checkpoint(str(d))


def test_missing_key(tmp_path):
    d = copy_dir(tmp_path)
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if not k.startswith("visual.merger.mlp.2")})
    with pytest.raises(CheckpointError,
                       match="2 missing tensor\\(s\\): visual.merger.mlp.2.bias, visual.merger.mlp.2.weight"):
        load_hf_checkpoint(str(d))


def test_corrupt_file(tmp_path):
    d = copy_dir(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_hf_checkpoint(str(d))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_round_trip_with_assets_and_dtype(tmp_path, capsys):
    src = copy_dir(tmp_path, name="hf")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 32768}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    orbax_dir, back = tmp_path / "orbax", tmp_path / "back"
    assert cli.main(["hf-to-orbax", "--src", str(src), "--dst", str(orbax_dir), "--dtype", "bfloat16"]) == 0
    assert (orbax_dir / "hf_assets" / "chat_template.jinja").is_file()
    assert cli.main(["orbax-to-hf", "--src", str(orbax_dir), "--dst", str(back)]) == 0
    assert "assets: tokenizer_config.json, chat_template.jinja" in capsys.readouterr().out
    assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 32768}'
    exported = load_file(back / "model.safetensors")
    assert {v.dtype for v in exported.values()} == {np.dtype(ml_dtypes.bfloat16)}
    original = load_file(src / "model.safetensors")
    assert set(exported) == set(original)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k].astype(ml_dtypes.bfloat16), err_msg=k)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's reads left in flight
def test_a_torn_params_checkpoint_is_named_not_read(tmp_path):
    """A params checkpoint whose data files were cut short, or whose metadata is gone (a copy that stopped
    half-way): a CheckpointError naming the directory, never Orbax's own error from deep inside a read."""
    cfg, params = load_hf_checkpoint(SRC)
    def cut(d):
        for f in (d / "ocdbt.process_0" / "d").iterdir():
            os.truncate(f, 10)

    for name, tear in (("cut", cut), ("no_metadata", lambda d: os.remove(d / "_METADATA"))):
        checkpoint.save_params(str(tmp_path / name), params, cfg)
        tear(tmp_path / name / "params")
        with pytest.raises(CheckpointError, match=f"{tmp_path / name / 'params'}.*(incomplete or corrupt|incomplete)"):
            checkpoint.load_params(str(tmp_path / name))
    with pytest.raises(CheckpointError, match="no model_config.json"):
        checkpoint.load_params(str(tmp_path))


def test_orbax_params_round_trip(tmp_path):
    cfg, params = load_hf_checkpoint(SRC)
    checkpoint.save_params(str(tmp_path / "p"), params, cfg)
    cfg2, params2 = checkpoint.load_params(str(tmp_path / "p"))
    assert cfg2 == cfg
    leaves_equal(params2, params)
