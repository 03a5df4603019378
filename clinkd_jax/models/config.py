"""Model configuration: frozen dataclasses, kept apart from the run config (ml_collections).

A model's *family* (`FAMILIES`: Qwen2-VL, Qwen2.5-VL) is a property of its checkpoint: `config.json`'s
`model_type` picks it. Both share the Qwen2 LLM with M-RoPE, the position ids, the image processor and
the chat template; they differ in the vision tower, which `VisionConfig` describes by feature (norm, MLP,
window attention) so that the model code branches on features, never on the family's name.

`Qwen2VLConfig.from_hf_dict` reads every `config.json` layout these checkpoints are found in: the flat
layout of the published files (text fields at the root, `rope_scaling`, `in_chans`) and the nested layout
transformers 5 writes (`text_config`, `rope_parameters`, `in_channels`). `to_hf_dict` writes the published
(flat) layout of the config's family, which every transformers release since 4.49 loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Special token ids shared by every Qwen2-VL size (clinkd-spec §1.2).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


# family -> (Hugging Face model_type, architecture class); what `to_hf_dict` writes and `from_hf_dict` accepts
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
}
VISION_NORMS = ("layer_norm", "rms_norm")
VISION_MLPS = ("fc", "gated")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working Qwen2-VL family model."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT tower and patch merger (unchanged by ClinKD). Defaults: Qwen2-VL's; Qwen2.5-VL's tower sets
    norm="rms_norm", mlp="gated", intermediate_size, window_size and fullatt_block_indexes."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    norm: str = "layer_norm"  # blocks and merger: "layer_norm" (Qwen2-VL) | "rms_norm" (Qwen2.5-VL)
    mlp: str = "fc"  # "fc": fc1 -> act -> fc2 (Qwen2-VL) | "gated": act(gate) * up -> down, with biases (Qwen2.5-VL)
    intermediate_size: int = 0  # the MLP's width; 0 = embed_dim * mlp_ratio (then mlp_ratio is unused)
    window_size: int = 0  # window attention's side in pixels (Qwen2.5-VL: 112); 0 = whole-image attention only
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend over the whole image when window_size > 0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)

    @property
    def window_patches(self) -> int:
        """Patches along one side of an attention window (8 for 112 px windows of 14 px patches)."""
        return self.window_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal x patch x patch (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_tokens(self) -> int:
        """Patches merged into one LLM token (4 for a 2x2 merge)."""
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal rotary embedding."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """A whole Qwen2-VL-family model: vision tower + merger + Qwen2 LLM, and the ids that tie them together."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    # Tokenizer id of each embedding row when the vocabulary was compacted (`clinkd_jax.data.vocab`);
    # None: row k is token k, as in every published checkpoint.
    vocab_ids: tuple[int, ...] | None = None
    family: str = "qwen2_vl"  # a key of FAMILIES: which checkpoints it reads and writes

    def __post_init__(self):
        validate(self)

    def replace(self, **kw) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "Qwen2VLConfig":
        family = d.get("model_type") or "qwen2_vl"
        if family not in FAMILIES:
            raise ConfigError(f"{source}: model_type is {family!r}, expected one of {sorted(FAMILIES)}")
        if "vision_config" not in d:
            raise ConfigError(f"{source}: no 'vision_config' section; is this a {family} checkpoint?")
        t = dict(d.get("text_config") or {})
        for key, value in d.items():  # flat (published) layout: text fields live at the root
            if key not in ("text_config", "vision_config"):
                t.setdefault(key, value)
        rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
        v = dict(d["vision_config"])
        tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
        try:
            text = TextConfig(
                vocab_size=int(t["vocab_size"]),
                hidden_size=int(t["hidden_size"]),
                intermediate_size=int(t["intermediate_size"]),
                num_hidden_layers=int(t["num_hidden_layers"]),
                num_attention_heads=int(t["num_attention_heads"]),
                num_key_value_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
                hidden_act=t.get("hidden_act", "silu"),
                rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))),
                mrope_section=tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24))),
                max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
                tie_word_embeddings=tie,
            )
            common = dict(
                depth=int(v["depth"]),
                num_heads=int(v["num_heads"]),
                in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
                patch_size=int(v.get("patch_size", 14)),
                temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                spatial_merge_size=int(v.get("spatial_merge_size", 2)),
                rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            )
            if family == "qwen2_5_vl":  # hidden_size is the tower's width, out_hidden_size the merger's output
                merger_out = v.get("out_hidden_size")
                vision = VisionConfig(
                    embed_dim=int(v["hidden_size"]), hidden_act=v.get("hidden_act", "silu"), norm="rms_norm",
                    mlp="gated", intermediate_size=int(v["intermediate_size"]), window_size=int(v["window_size"]),
                    fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ())), **common,
                )
            else:  # Qwen2-VL: embed_dim is the tower's width, hidden_size the merger's output
                merger_out = v.get("hidden_size")
                vision = VisionConfig(embed_dim=int(v["embed_dim"]), mlp_ratio=float(v.get("mlp_ratio", 4)),
                                      hidden_act=v.get("hidden_act", "quick_gelu"), **common)
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        if merger_out is not None and int(merger_out) != text.hidden_size:
            raise ConfigError(
                f"{source}: vision_config's merger output ({merger_out}) must equal the LLM "
                f"hidden_size={text.hidden_size}"
            )
        return cls(
            vision=vision,
            text=text,
            image_token_id=int(d.get("image_token_id", IMAGE_TOKEN_ID)),
            video_token_id=int(d.get("video_token_id", VIDEO_TOKEN_ID)),
            vision_start_token_id=int(d.get("vision_start_token_id", VISION_START_TOKEN_ID)),
            vision_end_token_id=int(d.get("vision_end_token_id", VISION_END_TOKEN_ID)),
            bos_token_id=t.get("bos_token_id", 151643),
            eos_token_id=t.get("eos_token_id", 151645),
            vocab_ids=None if d.get("clinkd_vocab_ids") is None else tuple(int(i) for i in d["clinkd_vocab_ids"]),
            family=family,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "Qwen2VLConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint "
                              "directory)")
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """The published (flat) config.json layout of the config's family."""
        t, v = self.text, self.vision
        extra = {} if self.vocab_ids is None else {"clinkd_vocab_ids": list(self.vocab_ids)}  # ours, not HF's
        model_type, architecture = FAMILIES[self.family]
        common = {"depth": v.depth, "num_heads": v.num_heads, "hidden_act": v.hidden_act, "in_chans": v.in_channels,
                  "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
                  "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size}
        if self.family == "qwen2_5_vl":
            vision = {**common, "hidden_size": v.embed_dim, "out_hidden_size": t.hidden_size,
                      "intermediate_size": v.mlp_dim, "window_size": v.window_size,
                      "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": 2}
        else:
            vision = {**common, "embed_dim": v.embed_dim, "hidden_size": t.hidden_size,
                      "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio}
        return {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": vision,
            **extra,
        }


def validate(cfg: Qwen2VLConfig) -> None:
    t, v = cfg.text, cfg.vision
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError(f"text.hidden_size={t.hidden_size} is not divisible by "
                          f"num_attention_heads={t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(
            f"text.num_attention_heads={t.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={t.num_key_value_heads}"
        )
    if t.head_dim % 2 or sum(t.mrope_section) * 2 != t.head_dim:
        raise ConfigError(
            f"text.mrope_section={list(t.mrope_section)} must sum to head_dim/2={t.head_dim // 2} "
            f"(head_dim={t.head_dim})"
        )
    if len(t.mrope_section) != 3:
        raise ConfigError(f"text.mrope_section must have 3 entries (t, h, w), got {list(t.mrope_section)}")
    if v.embed_dim % v.num_heads:
        raise ConfigError(f"vision.embed_dim={v.embed_dim} is not divisible by num_heads={v.num_heads}")
    if v.head_dim % 4:
        raise ConfigError(f"vision head_dim={v.head_dim} must be a multiple of 4 (2-D rotary over row and column)")
    if cfg.vocab_ids is not None and len(cfg.vocab_ids) != t.vocab_size:
        raise ConfigError(f"vocab_ids has {len(cfg.vocab_ids)} entries for text.vocab_size={t.vocab_size}")
    if t.hidden_act not in ("silu", "swish"):
        raise ConfigError(f"text.hidden_act={t.hidden_act!r} is not supported (Qwen2 uses 'silu')")
    if v.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"):
        raise ConfigError(f"vision.hidden_act={v.hidden_act!r} is not supported")
    if cfg.family not in FAMILIES:
        raise ConfigError(f"family={cfg.family!r} is not one of {sorted(FAMILIES)}")
    if v.norm not in VISION_NORMS or v.mlp not in VISION_MLPS:
        raise ConfigError(f"vision.norm={v.norm!r} / vision.mlp={v.mlp!r}: expected one of {VISION_NORMS} / "
                          f"{VISION_MLPS}")
    tower = (v.norm, v.mlp, v.window_size > 0)
    if tower != FAMILY_TOWERS[cfg.family]:  # what the family's checkpoints can hold
        raise ConfigError(f"family {cfg.family!r} has vision norm/mlp/windows {FAMILY_TOWERS[cfg.family]}, "
                          f"not {tower}; use `as_family` to build a tower of that family")
    if v.window_size:
        unit = v.patch_size * v.spatial_merge_size
        if v.window_size % unit:
            raise ConfigError(f"vision.window_size={v.window_size} must be a multiple of patch_size x "
                              f"spatial_merge_size = {unit} (windows are whole merged tokens)")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ConfigError(f"vision.fullatt_block_indexes {bad} are not blocks of a depth-{v.depth} tower")


FAMILY_TOWERS = {"qwen2_vl": ("layer_norm", "fc", False), "qwen2_5_vl": ("rms_norm", "gated", True)}


def as_family(cfg: Qwen2VLConfig, family: str) -> Qwen2VLConfig:
    """`cfg` (a preset: sizes, ids) with the vision tower of `family`, for models built from scratch
    (`model.family`). Qwen2.5-VL's tower: RMSNorm, gated SiLU MLP of the same width, 112 px windows, the
    last block of every quarter of the tower attending over the whole image (as 7, 15, 23, 31 of 32)."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}")
    if family == cfg.family:
        return cfg
    v = cfg.vision
    if family == "qwen2_5_vl":
        step = max(v.depth // 4, 2)  # a tower of 2-7 blocks keeps at least one windowed block
        vision = dataclasses.replace(v, norm="rms_norm", mlp="gated", hidden_act="silu", intermediate_size=v.mlp_dim,
                                     mlp_ratio=VisionConfig.mlp_ratio,
                                     window_size=112, fullatt_block_indexes=tuple(range(step - 1, v.depth, step)))
    else:
        vision = dataclasses.replace(v, norm="layer_norm", mlp="fc", hidden_act="quick_gelu", intermediate_size=0,
                                     mlp_ratio=v.mlp_dim / v.embed_dim, window_size=0, fullatt_block_indexes=())
    return cfg.replace(family=family, vision=vision)


# ------------------------------------------------------------------------- presets
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
           "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b, "tiny": tiny, "tiny_qwen": tiny_qwen}
