"""Generation: jitted prefill + decode, prompts, SASG."""
