"""Attention kernels and their plain-PyTorch references. Imports nothing from r4b_core.

split_kv.py          the Triton split-KV flash-decoding kernels for one query token per sequence, GQA-packed
                     (the query heads of a KV head share one K/V read): one split kernel for both cache
                     layouts (a contiguous cache is a paged one with one block per sequence; ``PAGED`` is a
                     constexpr), the merge kernel, the split heuristic, the shared launch checks and launch
decode_attention.py  the eager entry point ``decode_attention`` and the input checks of both layouts: a
                     contiguous cache [B, Hkv, S, D], or with ``block_table=`` a pool of fixed-size blocks
                     (PagedAttention layout [num_blocks, block_size, Hkv, D]) read through a block table
decode_op.py         both as custom ops ``torch.ops.r4b.decode_attention`` / ``torch.ops.r4b.paged_decode_attention``
                     (torch.library; opaque to torch.compile, no host sync): ``decode_attention_op``, and the
                     paged op's dispatch (Triton on CUDA, gather-then-SDPA elsewhere): ``paged_decode_attention_op``
backend.py           "auto" / "sdpa" / "triton" resolved for a device, dtype and head geometry (both caches;
                     imports no Triton)
triton_runtime.py    where kernels run: Triton availability, compiled (CUDA) vs interpreted (CPU,
                     TRITON_INTERPRET=1) wrapping, and the interpreter shim for Triton's own library
reference.py         the same computations in plain PyTorch (contiguous and paged), the ground truth for tests

The dispatcher that chooses between them and SDPA is r4b_core/models/attention.py.
"""
