"""Check the Triton decode-attention kernel (r4b_kernels/split_kv.py) on both cache layouts against the PyTorch
reference and time it.

On a GPU: R-4B's decoder shape (32 query / 8 KV heads, head_dim 128) and the SigLIP head_dim (72) in
bf16/fp16/fp32, ragged batches, lengths up to 32k; the paged layout (``paged_*`` cases: ``block_table=``) on
the same values scattered into a pool of 16-token blocks in random order, with a shared prefix. Then timings
at contexts 1k, 4k, 8k and 32k: the kernel on a contiguous cache, on the paged one (random block table), the paged
SDPA fallback (gather + SDPA), SDPA (flash and memory-efficient backends, where they accept the shape)
and the K/V-bytes roofline (K and V bytes read / the device's measured copy bandwidth).

``--dry-run`` runs the same code paths on the CPU with TRITON_INTERPRET=1 and tiny shapes, so that
CI keeps the script from rotting. Writes one JSON object (``--json PATH``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call (CUDA events on GPU, wall clock on CPU), after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def make_inputs(batch, n_heads, n_kv_heads, head_dim, lengths, capacity, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, n_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, n_kv_heads, capacity, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, n_kv_heads, capacity, head_dim, generator=gen).to(device, dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, k, v, seq_lens


def to_paged(k, v, lengths, block_size, shared_blocks=0, seed=0):
    """The same values as the contiguous k/v [B, Hkv, S, D] in a pool [NB, P, Hkv, D] of blocks handed out in
    random order, with a block table [B, M] int32; the first ``shared_blocks`` blocks of sequence 0 also serve
    as the first blocks of every other sequence (their values are copied over in k/v, so both layouts agree)."""
    B, Hkv, S, D = k.shape
    M = -(-S // block_size)
    pad = M * block_size - S
    if shared_blocks:
        n = shared_blocks * block_size
        k[1:, :, :n], v[1:, :, :n] = k[:1, :, :n], v[:1, :, :n]
    kt = torch.nn.functional.pad(k, (0, 0, 0, pad)).transpose(1, 2).reshape(B * M, block_size, Hkv, D)
    vt = torch.nn.functional.pad(v, (0, 0, 0, pad)).transpose(1, 2).reshape(B * M, block_size, Hkv, D)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(B * M, generator=gen).to(k.device)  # logical block i lives at pool block perm[i]
    k_pool, v_pool = torch.empty_like(kt), torch.empty_like(vt)
    k_pool[perm], v_pool[perm] = kt, vt
    table = perm.reshape(B, M).to(torch.int32)
    table[1:, :shared_blocks] = table[:1, :shared_blocks]  # later sequences point at sequence 0's blocks
    for b, n in enumerate(lengths):  # entries past a length are never read: make them garbage
        table[b, -(-n // block_size):] = -1
    return k_pool, v_pool, table


def correctness(cases, device):
    from r4b_kernels.decode_attention import decode_attention
    from r4b_kernels.reference import decode_attention_reference

    rows = []
    for name, (batch, hq, hkv, d, lengths, dtype) in cases.items():
        capacity = max(lengths)
        q, k, v, lens = make_inputs(batch, hq, hkv, d, lengths, capacity, dtype, device)
        scale = d**-0.5
        if name.startswith("paged_"):  # 16-token blocks, random order; sequences share a prefix when they can
            shared = min(lengths) // 16 if batch > 1 else 0
            k_pool, v_pool, table = to_paged(k, v, lengths, 16, shared_blocks=shared)
            got = decode_attention(q, k_pool, v_pool, lens, scale, block_table=table).float()  # validates (host sync)
        else:
            got = decode_attention(q, k, v, lens, scale).float()  # checks seq_lens (one host sync): fine here
        want = decode_attention_reference(q.float(), k.float(), v.float(), lens, scale)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        rows.append({"case": name, "max_rel_err": rel, "tolerance": tol, "passed": bool(rel <= tol)})
    return rows


def timings(contexts, device, dtype, repeats, batch, hq, hkv, d):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from r4b_kernels.decode_attention import decode_attention
    from r4b_kernels.decode_op import paged_decode_attention_sdpa

    from r4b_core.bench.decode import copy_bandwidth

    bandwidth = copy_bandwidth(device, 2 * 1024**3 if device.type == "cuda" else 256 * 1024**2)
    rows = []
    for context in contexts:
        q, k, v, lens = make_inputs(batch, hq, hkv, d, [context] * batch, context, dtype, device)
        scale = d**-0.5
        kv_bytes = 2 * k.numel() * k.element_size()
        k_pool, v_pool, table = to_paged(k, v, [context] * batch, 16)
        row = {"context": context, "batch": batch,
               "triton_us": 1e6 * time_fn(lambda: decode_attention(q, k, v, lens, scale, check_seq_lens=False),
                                          device, repeats),
               "paged_us": 1e6 * time_fn(lambda: decode_attention(q, k_pool, v_pool, lens, scale, block_table=table,
                                                                  check_seq_lens=False), device, repeats),
               "paged_sdpa_us": 1e6 * time_fn(lambda: paged_decode_attention_sdpa(q, k_pool, v_pool, table, lens,
                                                                                  scale), device, repeats)}
        row["paged_vs_contiguous"] = row["paged_us"] / row["triton_us"]
        for label, backend in (("sdpa_flash_us", SDPBackend.FLASH_ATTENTION),
                               ("sdpa_efficient_us", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    row[label] = 1e6 * time_fn(lambda: F.scaled_dot_product_attention(
                        q[:, :, None], k, v, scale=scale, enable_gqa=True), device, repeats)
            except RuntimeError as e:  # the backend rejects this shape/device
                row[label] = None
                row[label.replace("_us", "_error")] = str(e).splitlines()[0][:120]
        row["kv_bytes"] = kv_bytes
        row["roofline_us"] = 1e6 * kv_bytes / bandwidth
        row["fraction_of_copy_bandwidth"] = row["roofline_us"] / row["triton_us"]
        rows.append(row)
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        cases = {
            "gqa2_d64_ragged_fp32": (2, 4, 2, 64, [1, 37], torch.float32),
            "siglip_d72_fp32": (1, 2, 2, 72, [19], torch.float32),
            "gqa4_d128_bf16": (1, 8, 2, 128, [40], torch.bfloat16),
            "paged_gqa2_d64_ragged_fp32": (3, 4, 2, 64, [1, 37, 16], torch.float32),
            "paged_gqa4_d128_bf16": (2, 8, 2, 128, [40, 33], torch.bfloat16),
        }
        contexts, repeats, shape = [64, 128], 2, (1, 8, 2, 128)
        batched_contexts, batched_shape = [64], (2, 8, 2, 128)
        timing_dtype = torch.float32
    else:
        if not torch.cuda.is_available():
            print("kernel_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        cases = {
            "r4b_b1_1k_bf16": (1, 32, 8, 128, [1024], torch.bfloat16),
            "r4b_b4_ragged_bf16": (4, 32, 8, 128, [1, 511, 4097, 8192], torch.bfloat16),
            "r4b_b1_32k_bf16": (1, 32, 8, 128, [32768], torch.bfloat16),
            "r4b_b2_ragged_fp16": (2, 32, 8, 128, [3000, 77], torch.float16),
            "r4b_b2_ragged_fp32": (2, 32, 8, 128, [2048, 5], torch.float32),
            "siglip_d72_bf16": (2, 16, 16, 72, [729, 300], torch.bfloat16),
            "d64_gqa1_bf16": (2, 8, 8, 64, [1000, 1], torch.bfloat16),
            "paged_r4b_b4_ragged_bf16": (4, 32, 8, 128, [1, 511, 4097, 8192], torch.bfloat16),
            "paged_r4b_b3_shared_bf16": (3, 32, 8, 128, [3000, 2900, 4096], torch.bfloat16),
            "paged_r4b_b1_32k_bf16": (1, 32, 8, 128, [32768], torch.bfloat16),
            "paged_r4b_b2_ragged_fp16": (2, 32, 8, 128, [3000, 77], torch.float16),
            "paged_r4b_b2_ragged_fp32": (2, 32, 8, 128, [2048, 5], torch.float32),
            "paged_siglip_d72_bf16": (2, 16, 16, 72, [729, 300], torch.bfloat16),
        }
        contexts, repeats, shape = [1024, 4096, 8192, 32768], 50, (1, 32, 8, 128)
        batched_contexts, batched_shape = [1024, 4096, 8192], (8, 32, 8, 128)  # a server's batch of 8
        timing_dtype = torch.bfloat16
    result = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "correctness": correctness(cases, device),
              "timing": timings(contexts, device, timing_dtype, repeats, *shape),
              "timing_batched": timings(batched_contexts, device, timing_dtype, repeats, *batched_shape)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    for row in result["correctness"]:
        print(f"{row['case']:<28} max rel err {row['max_rel_err']:.2e} (tol {row['tolerance']:.0e}) "
              f"{'ok' if row['passed'] else 'FAIL'}")
    return 0 if all(r["passed"] for r in result["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
