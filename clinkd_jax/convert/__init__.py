"""Checkpoint conversion: Hugging Face safetensors <-> our params, and the `python -m clinkd_jax.convert` CLI."""
