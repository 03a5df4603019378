"""Published model sizes as configs (their config.json geometry), and the tiny models of the tests and the demo.

`PRESETS` is what `model.preset` / `teacher.preset` name; a run that reads a checkpoint takes its geometry from
the checkpoint's config.json instead (`Qwen2VLConfig.from_hf_dict`).
"""

from __future__ import annotations

import dataclasses

from clinkd_jax.models.config import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    Qwen2VLConfig,
    TextConfig,
    VisionConfig,
)


def qwen2vl_7b() -> Qwen2VLConfig:
    return Qwen2VLConfig()


def qwen2vl_2b() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text=TextConfig(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
        )
    )


def qwen2vl_72b() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text=TextConfig(
            vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8,
        )
    )


def _qwen25_tower() -> VisionConfig:
    """Qwen2.5-VL-3B/7B's vision tower (their published vision_config)."""
    return VisionConfig(depth=32, embed_dim=1280, num_heads=16, hidden_act="silu", norm="rms_norm", mlp="gated",
                        intermediate_size=3420, window_size=112, fullatt_block_indexes=(7, 15, 23, 31))


def qwen2_5_vl_3b() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        family="qwen2_5_vl", vision=_qwen25_tower(),
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                        max_position_embeddings=128000),
    )


def qwen2_5_vl_7b() -> Qwen2VLConfig:
    return Qwen2VLConfig(family="qwen2_5_vl", vision=_qwen25_tower(),
                         text=dataclasses.replace(TextConfig(), max_position_embeddings=128000))


def _qwen3_vl(vision_depth, vision_width, vision_mlp, deepstack, **text) -> Qwen2VLConfig:
    """A Qwen3-VL dense size from its published config.json: the tower's fixed parts, the Qwen3 LLM's."""
    vision = VisionConfig(depth=vision_depth, embed_dim=vision_width, num_heads=16, hidden_act="gelu_pytorch_tanh",
                          intermediate_size=vision_mlp, patch_size=16, patch_bias=True, num_position_embeddings=2304,
                          deepstack_visual_indexes=deepstack)
    return Qwen2VLConfig(family="qwen3_vl", vision=vision, text=TextConfig(
        vocab_size=151936, num_key_value_heads=8, head_size=128, rope_theta=5_000_000.0, mrope_section=(24, 20, 20),
        max_position_embeddings=262144, attention_bias=False, qk_norm=True, mrope_interleaved=True, **text))


def qwen3_vl_2b() -> Qwen2VLConfig:
    return _qwen3_vl(24, 1024, 4096, (5, 11, 17), hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                     num_attention_heads=16, tie_word_embeddings=True)


def qwen3_vl_4b() -> Qwen2VLConfig:
    return _qwen3_vl(24, 1024, 4096, (5, 11, 17), hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True)


def qwen3_vl_8b() -> Qwen2VLConfig:
    return _qwen3_vl(27, 1152, 4304, (8, 16, 24), hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False)


def tiny(**text_overrides) -> Qwen2VLConfig:
    """A few-hundred-thousand-parameter model for tests and the CPU demo.

    Special ids sit at the top of a 256-token vocabulary so random token ids below 240 never collide.
    """
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mrope_section=(2, 3, 3), max_position_embeddings=4096,
    )
    text.update(text_overrides)
    return Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0),
        text=TextConfig(**text),
        image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        bos_token_id=254, eos_token_id=255,
    )


def tiny_qwen(**text_overrides) -> Qwen2VLConfig:
    """`tiny` geometry with the real Qwen2-VL vocabulary and special ids (runs on the real tokenizer)."""
    cfg = tiny(vocab_size=151936, **text_overrides)
    return cfg.replace(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                       vision_start_token_id=VISION_START_TOKEN_ID, vision_end_token_id=VISION_END_TOKEN_ID,
                       bos_token_id=151643, eos_token_id=151645)


PRESETS = {"qwen2vl_2b": qwen2vl_2b, "qwen2vl_7b": qwen2vl_7b, "qwen2vl_72b": qwen2vl_72b,
           "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b, "qwen3_vl_2b": qwen3_vl_2b,
           "qwen3_vl_4b": qwen3_vl_4b, "qwen3_vl_8b": qwen3_vl_8b, "tiny": tiny, "tiny_qwen": tiny_qwen}
