"""clinkd_jax: ClinKD (Qwen2-VL + MCG-RoPE + clinical knowledge distillation) in JAX/Flax."""

__version__ = "0.1.0"
