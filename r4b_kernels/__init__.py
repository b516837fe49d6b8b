"""Attention kernels and their plain-PyTorch references.

decode_attention.py  Triton split-KV flash-decoding for one query token per sequence against the KV
                     cache, GQA-packed (the query heads of a KV head share one K/V read); also exposed
                     as the custom op ``torch.ops.r4b.decode_attention`` (opaque to torch.compile)
reference.py         the same computation in plain PyTorch, the ground truth for tests

The dispatcher that chooses between them and SDPA is r4b_core/attention.py.
"""
