"""The trainer: objectives, losses, the DeepSpeed engine and loop, checkpoints, preemption and non-finite steps."""
