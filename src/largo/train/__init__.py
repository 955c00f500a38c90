"""Training stage: the loop, optimizers and schedules, checkpoints, and process/device helpers."""
