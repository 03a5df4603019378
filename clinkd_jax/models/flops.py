"""Model FLOPs of a training step, for MFU: matmul FLOPs (2 per multiply-add) as the model defines them,
independent of how an implementation schedules, recomputes or skips them.

Per row of L text positions (image tokens, prompt and padding included) holding images of n_i patches:

    LLM, forward      2 * N_llm * L  +  4 * layers * heads * head_dim * (causal pairs of L)
                      N_llm = per layer (q, k, v, o, gate, up, down weights) x layers + the LM head (h x V)
    vision, forward   2 * N_vit * sum(n_i) + 4 * depth * embed_dim * sum(n_i^2)  +  mergers (n_i / 4 tokens; Qwen3-VL
                      has one more per DeepStack level)
    trained parts     x 3 (forward, and a backward pass of twice its FLOPs: input and weight gradients)
    frozen parts      x 1 (forward only: a frozen vision tower gets no backward pass)
    LoRA              x 2 for a tower with adapters (forward, and input gradients: its frozen weights get none;
                      the adapters' own FLOPs, rank << width, are left out); x 2 for the LLM under a vision adapter
    KD                + the teacher's forward (same formulas, x 1)

"causal pairs" is L (L + 1) / 2 with `causal=True` (what a causal kernel needs) and L^2 without (what a
dense-mask implementation computes). Biases, norms, rotary embeddings and softmax are left out (< 1 %
at published sizes). MFU = model FLOPs / step time / peak FLOP/s of the chip.
"""

from __future__ import annotations

from clinkd_jax.models.config import Qwen2VLConfig

# Dense bfloat16 peak FLOP/s per chip, by `jax.Device.device_kind` (vendor data sheets; no sparsity).
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def llm_params(cfg: Qwen2VLConfig) -> int:
    """Weights the LLM multiplies each position by (embedding lookup excluded, LM head included)."""
    t = cfg.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    return t.num_hidden_layers * (attn + 3 * t.hidden_size * t.intermediate_size) + t.hidden_size * t.vocab_size


def vision_params(cfg: Qwen2VLConfig) -> int:
    """Weights each patch is multiplied by: patch embedding + blocks (merger counted per merged token)."""
    v = cfg.vision
    return v.patch_dim * v.embed_dim + v.depth * (4 * v.embed_dim**2 + 2 * v.embed_dim * v.mlp_dim)


def merger_params(cfg: Qwen2VLConfig) -> int:
    """Weights per merged token of the merger and of Qwen3-VL's DeepStack mergers (the same shapes each)."""
    m = cfg.vision.embed_dim * cfg.vision.merge_tokens
    return (m * m + m * cfg.text.hidden_size) * (1 + len(cfg.vision.deepstack_visual_indexes))


def forward_flops(cfg: Qwen2VLConfig, length: int, image_patches=(), *, causal: bool = True) -> dict[str, float]:
    """{"llm": ..., "vision": ...}: forward FLOPs of one row of `length` positions with images of the given
    patch counts."""
    t, v = cfg.text, cfg.vision
    pairs = length * (length + 1) / 2 if causal else length * length
    llm = 2 * llm_params(cfg) * length + 4 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * pairs
    vision = sum(2 * vision_params(cfg) * n + 4 * v.depth * v.embed_dim * n * n
                 + 2 * merger_params(cfg) * (n // v.merge_tokens) for n in image_patches)
    return {"llm": float(llm), "vision": float(vision)}


def train_step_flops(cfg: Qwen2VLConfig, rows: int, length: int, image_patches=(), *, teacher: Qwen2VLConfig | None
                     = None, train_vision: bool = False, causal: bool = True, adapters: bool = False) -> float:
    """Model FLOPs of one optimizer step over `rows` rows like the one `forward_flops` describes (the LLM is
    trained; the vision tower too if `train_vision`; with `adapters`, LoRA adapters are what is trained there);
    with `teacher`, its forward pass is added."""
    f = forward_flops(cfg, length, image_patches, causal=causal)
    trained = 2 if adapters else 3
    total = trained * f["llm"] + (trained if train_vision else 1) * f["vision"]
    if teacher is not None:
        total += sum(forward_flops(teacher, length, image_patches, causal=causal).values())
    return rows * total


def generate_flops(cfg: Qwen2VLConfig, rows: int, prompt: int, image_patches=(), new_tokens: int = 1) -> float:
    """Model FLOPs of one generate call: the prefill of `rows` prompts of `prompt` positions (images included),
    then `new_tokens - 1` one-token decode steps, each attending over the prompt and the tokens before it."""
    t = cfg.text
    prefill = sum(forward_flops(cfg, prompt, image_patches).values())
    decode = sum(2 * llm_params(cfg) + 4 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * (prompt + i)
                 for i in range(1, new_tokens))
    return rows * (prefill + decode)
