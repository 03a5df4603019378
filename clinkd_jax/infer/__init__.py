"""Generation: jitted prefill + decode, prompts."""
