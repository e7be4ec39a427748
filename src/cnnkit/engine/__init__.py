"""Training engine: runtime choices, the loop, fit(), optimizers, callbacks, checkpoints."""
