"""Training helpers applied from outside the model: freezing, parameter groups, activation checkpointing, compile, FSDP2, LoRA, training data and crash-safe training state."""
