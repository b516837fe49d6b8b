"""Attention kernels and their plain-PyTorch references. Imports nothing from r4b_core.

decode_attention.py  Triton split-KV flash-decoding for one query token per sequence against the KV
                     cache, GQA-packed (the query heads of a KV head share one K/V read): the kernels,
                     input checks, the split heuristic and the eager entry point ``decode_attention``
paged_decode_attention.py  the same kernel reading K/V through a block table from a pool of fixed-size
                     blocks (PagedAttention layout [num_blocks, block_size, Hkv, D]): ``paged_decode_attention``
decode_op.py         both as custom ops ``torch.ops.r4b.decode_attention`` / ``torch.ops.r4b.paged_decode_attention``
                     (torch.library; opaque to torch.compile, no host sync): ``decode_attention_op``, and the
                     paged op's dispatch (Triton on CUDA, gather-then-SDPA elsewhere): ``paged_decode_attention_op``
triton_runtime.py    where kernels run: Triton availability, compiled (CUDA) vs interpreted (CPU,
                     TRITON_INTERPRET=1) wrapping, and the interpreter shim for Triton's own library
reference.py         the same computations in plain PyTorch (contiguous and paged), the ground truth for tests

The dispatcher that chooses between them and SDPA is r4b_core/models/attention.py.
"""
