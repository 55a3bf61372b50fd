"""The training run: data shapes, the loop, checkpoints, run locks."""
