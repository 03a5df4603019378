"""Model configuration: frozen dataclasses, kept apart from the run config (ml_collections).

A model's *family* (`FAMILIES`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) is a property of its checkpoint: `config.json`'s
`model_type` picks it. All share the position ids and the merge of 2x2 patches into one LLM token; they differ
in the vision tower (norm, MLP, window attention, learned position table, DeepStack) and the LLM (Qwen2 with
q/k/v biases, or Qwen3 with per-head q/k RMSNorm and interleaved M-RoPE), which `VisionConfig` and
`TextConfig` describe by feature, so that the model code branches on features, never on the family's name.

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

from clinkd_jax.errors import UserError

# Special token ids shared by every Qwen2-VL size (clinkd-spec §1.2).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


# family -> (Hugging Face model_type, architecture class); what `to_hf_dict` writes and `from_hf_dict` accepts
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
}
# what each family's checkpoints call the parts that differ (clinkd_jax.hf_checkpoint): the merger's norm and two
# linears, a prefix of the vision MLP's linears, and the key prefixes of the published layout (tower, LLM)
_QWEN2_NAMES = {"merger": ("ln_q", "mlp.0", "mlp.2"), "vision_mlp": "", "visual": "visual.", "llm": "model."}
HF_NAMES = {"qwen2_vl": _QWEN2_NAMES, "qwen2_5_vl": _QWEN2_NAMES,
            "qwen3_vl": {"merger": ("norm", "linear_fc1", "linear_fc2"), "vision_mlp": "linear_",
                         "visual": "model.visual.", "llm": "model.language_model."}}
VISION_NORMS = ("layer_norm", "rms_norm")
VISION_MLPS = ("fc", "gated")


class ConfigError(UserError):
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
    patch_bias: bool = False  # the patch embedding has a bias (Qwen3-VL)
    # a learned (side x side) position table, bilinearly resampled to each image's patch grid and added to the
    # patch embeddings (Qwen3-VL: 2304 = 48 x 48); 0 = none (the rotary alone places patches)
    num_position_embeddings: int = 0
    # DeepStack (Qwen3-VL): the outputs of these blocks, each through its own merger, are added to the image
    # tokens' hidden states after LLM layers 0, 1, ... in turn
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)

    @property
    def position_side(self) -> int:
        """Side of the learned position table (48 for Qwen3-VL's 2304 entries)."""
        return int(round(self.num_position_embeddings ** 0.5))

    @property
    def window_patches(self) -> int:
        """Patches along one side of an attention window (8 for 112 px windows of 14 px patches)."""
        return self.window_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal x patch x patch (1176 for Qwen2-VL, 1536 for Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_tokens(self) -> int:
        """Patches merged into one LLM token (4 for a 2x2 merge)."""
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 (or Qwen3) decoder with multimodal rotary embedding."""

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
    head_size: int = 0  # attention head width; 0 = hidden_size / num_attention_heads (Qwen2); Qwen3 sets it (128)
    attention_bias: bool = True  # q/k/v projections with biases (Qwen2) or without (Qwen3)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before the rotary (Qwen3)
    # M-RoPE frequencies: chunked t|h|w by mrope_section (Qwen2-VL) or interleaved t,h,w,t,h,w,... (Qwen3-VL)
    mrope_interleaved: bool = False

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_attention_heads


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
    # the checkpoint's image processor settings (clinkd_jax.data.processor); None / 0: the family's published ones
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    min_pixels: int = 0
    max_pixels: int = 0

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
        if t.get("use_sliding_window"):  # would change every long answer: refused, not ignored
            raise ConfigError(f"{source}: use_sliding_window is true; only full attention is implemented (every "
                              "published Qwen2-VL-family checkpoint has it off)")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope type {kind!r} is not supported (M-RoPE without scaling only)")
        tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
        try:
            text = _text_from_hf(t, rope, family, tie)
            vision, merger_out = _vision_from_hf(dict(d["vision_config"]), family)
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
        """The published config.json layout of the config's family: flat for Qwen2-VL and Qwen2.5-VL (text fields
        at the root), nested for Qwen3-VL (`text_config`)."""
        t, v = self.text, self.vision
        extra = {} if self.vocab_ids is None else {"clinkd_vocab_ids": list(self.vocab_ids)}  # ours, not HF's
        model_type, architecture = FAMILIES[self.family]
        common = {"depth": v.depth, "num_heads": v.num_heads, "hidden_act": v.hidden_act, "in_chans": v.in_channels,
                  "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
                  "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size}
        if self.family == "qwen3_vl":
            vision = {"depth": v.depth, "num_heads": v.num_heads, "hidden_act": v.hidden_act, "in_channels":
                      v.in_channels, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                      "spatial_merge_size": v.spatial_merge_size, "hidden_size": v.embed_dim,
                      "out_hidden_size": t.hidden_size, "intermediate_size": v.mlp_dim,
                      "num_position_embeddings": v.num_position_embeddings,
                      "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "model_type": "qwen3_vl"}
        elif self.family == "qwen2_5_vl":
            vision = {**common, "hidden_size": v.embed_dim, "out_hidden_size": t.hidden_size,
                      "intermediate_size": v.mlp_dim, "window_size": v.window_size,
                      "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": 2}
        else:
            vision = {**common, "embed_dim": v.embed_dim, "hidden_size": t.hidden_size,
                      "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio}
        text = {
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
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        ids = {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
               "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id}
        if self.family == "qwen3_vl":
            text.update(model_type="qwen3_vl_text", head_dim=t.head_dim, attention_bias=t.attention_bias,
                        rope_scaling={"rope_type": "default", "mrope_section": list(t.mrope_section),
                                      "mrope_interleaved": True})
            return {"architectures": [architecture], "model_type": model_type, "text_config": text,
                    "vision_config": vision, "tie_word_embeddings": t.tie_word_embeddings, **ids, **extra}
        return {"architectures": [architecture], "model_type": model_type, **text, "use_sliding_window": False,
                **ids, "vision_config": vision, **extra}


def validate(cfg: Qwen2VLConfig) -> None:
    t, v = cfg.text, cfg.vision
    if not t.head_size and t.hidden_size % t.num_attention_heads:
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
    have, want = features(cfg), FAMILY_FEATURES[cfg.family]
    if have != want:  # what the family's checkpoints can hold
        wrong = ", ".join(f"{k}={have[k]!r} (not {want[k]!r})" for k in want if have[k] != want[k])
        raise ConfigError(f"family {cfg.family!r} cannot hold {wrong}; use `as_family` to build a model of that "
                          "family")
    bad = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
    if bad or len(v.deepstack_visual_indexes) > t.num_hidden_layers:
        raise ConfigError(f"vision.deepstack_visual_indexes {list(v.deepstack_visual_indexes)}: each must be a block "
                          f"of the depth-{v.depth} tower, at most one per LLM layer ({t.num_hidden_layers})")
    if v.num_position_embeddings and v.position_side ** 2 != v.num_position_embeddings:
        raise ConfigError(f"vision.num_position_embeddings={v.num_position_embeddings} is not a square (the table "
                          "is side x side)")
    if v.window_size:
        unit = v.patch_size * v.spatial_merge_size
        if v.window_size % unit:
            raise ConfigError(f"vision.window_size={v.window_size} must be a multiple of patch_size x "
                              f"spatial_merge_size = {unit} (windows are whole merged tokens)")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ConfigError(f"vision.fullatt_block_indexes {bad} are not blocks of a depth-{v.depth} tower")


def features(cfg: Qwen2VLConfig) -> dict[str, Any]:
    """The architecture features that tell the families apart (`FAMILY_FEATURES`)."""
    t, v = cfg.text, cfg.vision
    return {"vision.norm": v.norm, "vision.mlp": v.mlp, "window attention": v.window_size > 0,
            "learned positions": v.num_position_embeddings > 0, "vision.patch_bias": v.patch_bias,
            "text.qk_norm": t.qk_norm, "text.attention_bias": t.attention_bias,
            "text.mrope_interleaved": t.mrope_interleaved}


_QWEN2_LLM = {"text.qk_norm": False, "text.attention_bias": True, "text.mrope_interleaved": False}
FAMILY_FEATURES = {
    "qwen2_vl": {"vision.norm": "layer_norm", "vision.mlp": "fc", "window attention": False,
                 "learned positions": False, "vision.patch_bias": False, **_QWEN2_LLM},
    "qwen2_5_vl": {"vision.norm": "rms_norm", "vision.mlp": "gated", "window attention": True,
                   "learned positions": False, "vision.patch_bias": False, **_QWEN2_LLM},
    "qwen3_vl": {"vision.norm": "layer_norm", "vision.mlp": "fc", "window attention": False,
                 "learned positions": True, "vision.patch_bias": True, "text.qk_norm": True,
                 "text.attention_bias": False, "text.mrope_interleaved": True},
}


def as_family(cfg: Qwen2VLConfig, family: str) -> Qwen2VLConfig:
    """`cfg` (a preset: sizes, ids) as a model of `family`, for models built from scratch (`model.family`); the
    widths and depths stay. Qwen2.5-VL's tower: RMSNorm, gated SiLU MLP, 112 px windows, the last block of every
    quarter of the tower attending over the whole image (as 7, 15, 23, 31 of 32). Qwen3-VL: 16 px patches with a
    bias, a learned 48 x 48 position table, tanh-GELU, DeepStack from the last block of each of the first three
    quarters of the tower (as 5, 11, 17 of 24), and the Qwen3 LLM (q/k norms, no q/k/v biases, interleaved M-RoPE)."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not one of {sorted(FAMILIES)}")
    if family == cfg.family:
        return cfg
    v, t = cfg.vision, cfg.text
    vision = dataclasses.replace(  # Qwen2-VL's tower and LLM first
        v, norm="layer_norm", mlp="fc", hidden_act="quick_gelu", intermediate_size=0, mlp_ratio=v.mlp_dim / v.embed_dim,
        window_size=0, fullatt_block_indexes=(), patch_size=14, patch_bias=False, num_position_embeddings=0,
        deepstack_visual_indexes=())
    text = dataclasses.replace(t, head_size=0, attention_bias=True, qk_norm=False, mrope_interleaved=False)
    step = max(v.depth // 4, 1)
    if family == "qwen2_5_vl":
        vision = dataclasses.replace(vision, norm="rms_norm", mlp="gated", hidden_act="silu",
                                     intermediate_size=v.mlp_dim, mlp_ratio=VisionConfig.mlp_ratio, window_size=112,
                                     fullatt_block_indexes=tuple(range(max(step, 2) - 1, v.depth, max(step, 2))))
    elif family == "qwen3_vl":
        deepstack = tuple(range(step - 1, v.depth, step))[: min(3, t.num_hidden_layers)]
        vision = dataclasses.replace(vision, hidden_act="gelu_pytorch_tanh", intermediate_size=v.mlp_dim,
                                     mlp_ratio=VisionConfig.mlp_ratio, patch_size=16, patch_bias=True,
                                     num_position_embeddings=2304, deepstack_visual_indexes=deepstack)
        text = dataclasses.replace(text, head_size=t.head_dim, attention_bias=False, qk_norm=True,
                                   mrope_interleaved=True)
    return cfg.replace(family=family, vision=vision, text=text)


def _text_from_hf(t: dict, rope: dict, family: str, tie: bool) -> TextConfig:
    """The LLM's geometry from config.json's text fields (`t`, flat or text_config) and its rope settings."""
    qwen3 = family == "qwen3_vl"  # the Qwen3 LLM: its own head width, no q/k/v biases, q/k norms
    return TextConfig(
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
        head_size=int(t.get("head_dim") or 0) if qwen3 else 0,
        attention_bias=bool(t.get("attention_bias", False)) if qwen3 else True,
        qk_norm=qwen3, mrope_interleaved=qwen3,  # transformers' Qwen3-VL always interleaves
    )


def _vision_from_hf(v: dict, family: str) -> tuple[VisionConfig, Any]:
    """The vision tower's geometry from config.json's vision_config, and the merger's output width it names
    (None where it names none): each family spells the tower's width differently."""
    common = dict(
        depth=int(v["depth"]),
        num_heads=int(v["num_heads"]),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", 16 if family == "qwen3_vl" else 14)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
    if family == "qwen3_vl":  # hidden_size is the tower's width, out_hidden_size the merger's output
        return VisionConfig(
            embed_dim=int(v["hidden_size"]), hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            intermediate_size=int(v["intermediate_size"]), patch_bias=True,
            num_position_embeddings=int(v["num_position_embeddings"]),
            deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", ())), **common,
        ), v.get("out_hidden_size")
    if family == "qwen2_5_vl":  # hidden_size is the tower's width, out_hidden_size the merger's output
        return VisionConfig(
            embed_dim=int(v["hidden_size"]), hidden_act=v.get("hidden_act", "silu"), norm="rms_norm",
            mlp="gated", intermediate_size=int(v["intermediate_size"]), window_size=int(v["window_size"]),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ())), **common,
        ), v.get("out_hidden_size")
    # Qwen2-VL: embed_dim is the tower's width, hidden_size the merger's output
    return VisionConfig(embed_dim=int(v["embed_dim"]), mlp_ratio=float(v.get("mlp_ratio", 4)),
                        hidden_act=v.get("hidden_act", "quick_gelu"), **common), v.get("hidden_size")
