"""Training: train state, losses, steps, checkpoints, the loop."""
