"""Model math: the Qwen3 decoder, the SigLIP tower, the projector, anyres tiling, attention, KV caches, hook points and the composed R-4B model."""
