"""Shared test fixtures: tiny Qwen2-VL configs, the reference batch, and the transformers side.

Everything torch-related is imported lazily so the Python 3.12 run (no torch) can import this module.
"""

from __future__ import annotations

import os

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
MERGE = 2

# Tiny random configs that differ where implementations tend to go wrong: grouped-query ratio,
# mrope_section, tied vs untied LM head, rope theta, vision width/heads/depth.
CONFIGS = {
    "gqa2_untied": dict(
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
                  rope_theta=1e6, tie=False),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
    ),
    "gqa4_tied": dict(
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, mrope_section=[4, 2, 2],
                  rope_theta=1e4, tie=True),
        vision=dict(depth=1, embed_dim=48, num_heads=3, mlp_ratio=4),
    ),
    "mha_head32": dict(
        text=dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3, mrope_section=[4, 6, 6],
                  rope_theta=1e6, tie=False),
        vision=dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2),
    ),
    # Qwen2.5-VL: windows of 2x2 merged tokens (4x4 patches: the batch's 4x6 and 6x6 images span 2 and 4 windows,
    # partial ones included) or of one merged token; full attention in different blocks; GQA ratios; tied/untied
    "q25_win56_gqa2": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
                  rope_theta=1e6, tie=False),
        vision=dict(depth=3, embed_dim=32, num_heads=2, intermediate_size=48, window_size=56,
                    fullatt_block_indexes=[1]),
    ),
    "q25_win28_tied": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, mrope_section=[2, 4, 2],
                  rope_theta=1e4, tie=True),
        vision=dict(depth=2, embed_dim=48, num_heads=3, intermediate_size=80, window_size=28,
                    fullatt_block_indexes=[0]),
    ),
    # Qwen3-VL: 16 px patches; a 4x4 learned position table (the batch's grids of 4-6 patches resample it
    # up and across) or 6x6; DeepStack from blocks 0 and 2 (into LLM layers 0, 1) or from block 1 only; a head
    # width that is not hidden/heads (32 vs 16); GQA ratios; tied/untied
    "q3_ds2_gqa2": dict(
        family="qwen3_vl",
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5],
                  rope_theta=5e6, tie=False),
        vision=dict(depth=3, embed_dim=32, num_heads=2, intermediate_size=48, num_position_embeddings=16,
                    deepstack_visual_indexes=[0, 2]),
    ),
    "q3_ds1_tied": dict(
        family="qwen3_vl",
        text=dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, head_dim=16, mrope_section=[4, 2, 2],
                  rope_theta=1e4, tie=True),
        vision=dict(depth=2, embed_dim=48, num_heads=3, intermediate_size=80, num_position_embeddings=36,
                    deepstack_visual_indexes=[1]),
    ),
}

# The reference batch: sample 0 one 4x6-patch image, right padding; sample 1 two images (4x4, 6x4),
# left padding; sample 2 text only. Image grids are in patches (t, h, w); each takes t*h*w/4 tokens.
GRIDS = [[(1, 4, 6)], [(1, 4, 4), (1, 6, 4)], []]
LENGTH = 24
NUM_PATCHES = 40


def patch_size(name: str) -> int:
    return 16 if CONFIGS[name].get("family") == "qwen3_vl" else 14


def hf_config(name: str):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    c = CONFIGS[name]
    t, v = c["text"], c["vision"]
    if c.get("family") == "qwen3_vl":
        text = _hf_text(t)
        text.update(head_dim=t["head_dim"], attention_bias=False)
        text["rope_parameters"]["mrope_interleaved"] = True
        return Qwen3VLConfig(
            text_config=text,
            vision_config=dict(
                depth=v["depth"], hidden_size=v["embed_dim"], out_hidden_size=t["hidden_size"],
                num_heads=v["num_heads"], intermediate_size=v["intermediate_size"], hidden_act="gelu_pytorch_tanh",
                num_position_embeddings=v["num_position_embeddings"],
                deepstack_visual_indexes=v["deepstack_visual_indexes"], patch_size=16, temporal_patch_size=2,
                spatial_merge_size=MERGE, in_channels=3,
            ),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
            tie_word_embeddings=t["tie"],
        )
    if c.get("family") == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            text_config=_hf_text(t),
            vision_config=dict(
                depth=v["depth"], hidden_size=v["embed_dim"], out_hidden_size=t["hidden_size"],
                num_heads=v["num_heads"], intermediate_size=v["intermediate_size"], hidden_act="silu",
                window_size=v["window_size"], fullatt_block_indexes=v["fullatt_block_indexes"], patch_size=14,
                temporal_patch_size=2, spatial_merge_size=MERGE, in_channels=3,
            ),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
            tie_word_embeddings=t["tie"],
        )
    return Qwen2VLConfig(
        text_config=_hf_text(t),
        vision_config=dict(
            depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=t["hidden_size"], num_heads=v["num_heads"],
            mlp_ratio=v["mlp_ratio"], patch_size=14, temporal_patch_size=2, spatial_merge_size=MERGE, in_channels=3,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=t["tie"],
    )


def _hf_text(t: dict) -> dict:
    return dict(
        vocab_size=256, hidden_size=t["hidden_size"], intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
        rope_parameters={"rope_type": "default", "mrope_section": t["mrope_section"], "rope_theta": t["rope_theta"]},
        max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=254, eos_token_id=255, pad_token_id=0,
    )


def hf_model_class(name: str):
    """transformers' model class of a reference config's family."""
    import transformers

    return {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
            }.get(CONFIGS[name].get("family"), transformers.Qwen2VLForConditionalGeneration)


def build_hf_model(name: str, seed: int = 0):
    """A random transformers Qwen2VLForConditionalGeneration with weights large enough to matter.

    The default init (std 0.02) makes logits nearly constant, which would let a wrong rotary layout
    or mask slip through; weights are redrawn from N(0, 0.1) and norm scales from N(1, 0.1).
    """
    import torch

    torch.manual_seed(seed)
    model = hf_model_class(name)._from_config(hf_config(name), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_norm_scale = pname.endswith("weight") and ("norm" in pname or "ln_q" in pname)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if is_norm_scale else 0.0))
    return model


def make_batch(seed: int = 0, patch: int = 14) -> dict[str, np.ndarray]:
    """input_ids / attention_mask (B, L), flat pixel_values (sum of patches, 3 * 2 * patch²), image_grid_thw."""
    rng = np.random.default_rng(seed)
    rows, pads = [], ["right", "left", "right"]
    text_lens = [[5, 4], [3, 2, 3], [9]]
    for grids, lens in zip(GRIDS, text_lens):
        ids = list(rng.integers(0, 240, lens[0]))
        for k, g in enumerate(grids):
            ids += [VSTART] + [IMAGE] * (int(np.prod(g)) // MERGE**2) + [VEND] + list(rng.integers(0, 240, lens[k + 1]))
        rows.append(ids)
    input_ids = np.zeros((len(rows), LENGTH), np.int64)
    mask = np.zeros((len(rows), LENGTH), np.int64)
    for i, (ids, pad) in enumerate(zip(rows, pads)):
        sl = slice(0, len(ids)) if pad == "right" else slice(LENGTH - len(ids), LENGTH)
        input_ids[i, sl], mask[i, sl] = ids, 1
    grids = np.array([g for gs in GRIDS for g in gs], np.int64)
    pixel_values = rng.standard_normal((int(np.prod(grids, axis=1).sum()), 3 * 2 * patch * patch)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grids}


def hf_outputs(model, batch) -> dict[str, np.ndarray]:
    """Reference outputs from transformers for `batch`."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    mm_types = (t["input_ids"] == IMAGE).int()
    with torch.no_grad():
        vis = model.model.visual(t["pixel_values"], grid_thw=t["image_grid_thw"])
        out = model(
            input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=t["pixel_values"],
            image_grid_thw=t["image_grid_thw"], mm_token_type_ids=mm_types,
        )
        pos, deltas = model.model.get_rope_index(  # by keyword: Qwen2.5-VL's has second_per_grid_ts before the mask
            t["input_ids"], mm_types, image_grid_thw=t["image_grid_thw"], attention_mask=t["attention_mask"]
        )
    hidden = vis.last_hidden_state
    window_size = getattr(model.config.vision_config, "window_size", 0)
    if window_size:  # Qwen2.5-VL returns the tower's output in its window order: put it back in patch order
        from transformers.vision_utils import get_vision_window_index

        unit = MERGE**2
        index, _ = get_vision_window_index(t["image_grid_thw"], MERGE, window_size, 14)
        hidden = hidden.reshape(-1, unit, hidden.shape[-1])[torch.argsort(index)].reshape(hidden.shape)
    extra = {}
    if getattr(vis, "deepstack_features", None):  # Qwen3-VL: (K, tokens, D)
        extra["deepstack"] = torch.stack(list(vis.deepstack_features)).float().numpy()
    return {
        "logits": out.logits.float().numpy(),
        "vision_hidden": hidden.float().numpy(),
        "vision_merged": vis.pooler_output.float().numpy(),
        "position_ids": pos.numpy(),
        "rope_deltas": deltas.numpy().reshape(-1),
        **extra,
    }


# ------------------------------------------------------------------------------------ JAX side
def jax_inputs(batch, gaps=(1, 1)) -> dict[str, np.ndarray]:
    """The reference batch in our input format (host-computed positions, per-sample patch buffers)."""
    from clinkd_jax.data import positions

    pos, deltas = positions.get_rope_index(
        batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
        image_token_id=IMAGE, spatial_merge_size=MERGE, gap_in=gaps[0], gap_out=gaps[1],
    )
    samples, at, k = [], 0, 0
    for grids in GRIDS:
        images = []
        for g in grids:
            n = int(np.prod(g))
            images.append((batch["pixel_values"][at : at + n], g))
            at, k = at + n, k + 1
        samples.append(images)
    vision = positions.pack_vision_inputs(samples, NUM_PATCHES, MERGE)
    return {
        "input_ids": batch["input_ids"].astype(np.int32),
        "attention_mask": batch["attention_mask"].astype(np.int32),
        "position_ids": pos,
        **vision,
    }, deltas


def load_golden(name: str):
    """(inputs, outputs); a config with its own patch size keeps its inputs beside its outputs."""
    own = os.path.join(GOLDEN, name, "inputs.npz")
    inputs = dict(np.load(own if os.path.exists(own) else os.path.join(GOLDEN, "inputs.npz")))
    outputs = dict(np.load(os.path.join(GOLDEN, name, "outputs.npz")))
    return inputs, outputs


def per_sample_vision(flat: np.ndarray, per_token: int = 1) -> list[np.ndarray]:
    """Split a flat (all images) vision output into per-sample arrays, in our buffer order."""
    out, at = [], 0
    for grids in GRIDS:
        n = sum(int(np.prod(g)) for g in grids) // per_token
        out.append(flat[at : at + n])
        at += n
    return out


# ------------------------------------------------------------------------------------ generation
# Mixed prompts for generation parity: different lengths, image counts and sizes (left padding).
GEN_GRIDS = [[(1, 4, 6)], [(1, 4, 4), (1, 6, 4)], [], [(1, 6, 6)]]
GEN_TEXT_LENS = [[5, 4], [3, 2, 3], [9], [2, 1]]
GEN_LENGTH = 32
GEN_PATCHES = 48
GEN_NEW_TOKENS = 10


def generation_prompts(seed: int = 1, patch: int = 14) -> list[dict]:
    """Unpadded prompts: ids (list), images [(patches (n, 3 * 2 * patch²), grid)]."""
    rng = np.random.default_rng(seed)
    out = []
    for grids, lens in zip(GEN_GRIDS, GEN_TEXT_LENS):
        ids = list(rng.integers(0, 240, lens[0]))
        images = []
        for k, g in enumerate(grids):
            ids += [VSTART] + [IMAGE] * (int(np.prod(g)) // MERGE**2) + [VEND] + list(rng.integers(0, 240, lens[k + 1]))
            images.append((rng.standard_normal((int(np.prod(g)), 3 * 2 * patch * patch)).astype(np.float32), g))
        out.append({"ids": [int(i) for i in ids], "images": images})
    return out


def hf_generate(model, prompts, max_new_tokens: int, eos_token_id, pad_token_id: int = 0) -> np.ndarray:
    """transformers `generate` (greedy) on left-padded prompts; returns the new tokens (B, <= max_new_tokens)."""
    import torch

    ids = np.full((len(prompts), GEN_LENGTH), pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, GEN_LENGTH - len(p["ids"]):], mask[i, GEN_LENGTH - len(p["ids"]):] = p["ids"], 1
    images = [im for p in prompts for im in p["images"]]
    t_ids = torch.from_numpy(ids)
    with torch.no_grad():
        out = model.generate(
            input_ids=t_ids, attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(np.concatenate([p for p, _ in images])),
            image_grid_thw=torch.tensor([g for _, g in images]), mm_token_type_ids=(t_ids == IMAGE).int(),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return out[:, GEN_LENGTH:].numpy()


def jax_generation_batch(prompts, gaps=(1, 1), pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """The same prompts in our left-padded format (`clinkd_jax.infer.prompts.collate_prompts`)."""
    from clinkd_jax.data import image as image_lib
    from clinkd_jax.data import positions
    from clinkd_jax.infer import prompts as prompts_lib

    samples = []
    for p in prompts:
        grids = np.asarray([g for _, g in p["images"]], np.int64).reshape(-1, 3)
        pos, _ = positions.get_rope_index(np.asarray(p["ids"])[None], grids, image_token_id=IMAGE,
                                          spatial_merge_size=MERGE, gap_in=gaps[0], gap_out=gaps[1])
        samples.append({"input_ids": np.asarray(p["ids"], np.int32), "position_ids": pos[:, 0], "images": p["images"]})
    width = next(im.shape[1] for p in prompts for im, _ in p["images"])  # 3 * 2 * patch²
    image = image_lib.ImageConfig(patch_size=int(round((width / 6) ** 0.5)))
    cfg = prompts_lib.PromptConfig(batch_size=len(prompts), pad_token_id=pad_token_id, image_token_id=IMAGE,
                                   image=image)
    return prompts_lib.collate_prompts(samples, (GEN_LENGTH, GEN_PATCHES), cfg)


def hf_generation_reference(model) -> dict[str, np.ndarray]:
    """Greedy tokens from transformers with two stop ids chosen so that rows stop at different steps
    (taken from an unconstrained first run), padded with 0 to GEN_NEW_TOKENS."""
    prompts = generation_prompts(patch=model.config.vision_config.patch_size)
    free = hf_generate(model, prompts, GEN_NEW_TOKENS, eos_token_id=255)
    stops = []
    for candidates in (((1, 4), (2, 2)), ((0, 3), (3, 5))):  # the second pair only where the first gave none
        for row, step in candidates if not stops else ():
            if free[row, step] not in stops and free[row, step] not in free[row, :step]:
                stops.append(int(free[row, step]))
    stops = stops or [255]
    tokens = hf_generate(model, prompts, GEN_NEW_TOKENS, eos_token_id=stops)
    padded = np.zeros((len(prompts), GEN_NEW_TOKENS), np.int64)
    padded[:, : tokens.shape[1]] = tokens
    return {"tokens": padded, "stop_token_ids": np.asarray(stops)}


def override(config, changes: dict):
    """Set dotted fields ("section.field": value) on an ml_collections run config; returns it."""
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config
