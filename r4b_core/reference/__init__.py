"""The transformers reference for parity and the random-init synthetic checkpoints (the only place transformers is imported outside tests)."""
