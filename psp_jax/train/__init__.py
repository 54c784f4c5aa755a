"""Training: the loop, the step, the state, config checks, optimiser, losses, checkpoints."""
