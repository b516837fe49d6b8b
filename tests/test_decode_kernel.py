"""The Triton split-KV decode kernel, run by the Triton interpreter on the CPU, against the PyTorch reference.

Every case draws fresh random inputs, poisons the output and the split workspace with NaN (an element the
kernel forgets to write fails the test) and fills the cache slots past each sequence's length with NaN (a
kernel that reads past ``seq_lens`` fails too). The reference is itself checked against SDPA.
"""

from __future__ import annotations

import os

# Before anything imports triton: @triton.jit reads TRITON_INTERPRET when it decorates (for Triton's own
# library, at `import triton`). The kernel module also copes when triton was imported first (see
# test_interpreter_when_triton_was_imported_first), so this is belt and braces.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import triton  # noqa: E402,F401  (the test extra installs it: a missing Triton must fail, not skip)

from r4b_kernels.decode_attention import (
    decode_attention,
    default_num_splits,
    is_available,
    make_workspace,
    supports,
    unavailable_reason,
)
from r4b_kernels.decode_op import decode_attention_op
from r4b_kernels.reference import decode_attention_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(B, Hkv, G, S, D, lens, dtype, seed, kv_dtype=None):
    """Fresh q [B, Hq, D], k/v [B, Hkv, S, D] (NaN past each length), seq_lens [B] int32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(kv_dtype or dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(kv_dtype or dtype)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q, k, v, torch.tensor(lens, dtype=torch.int32)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|a - b| / max|b|, in fp32."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def check(q, k, v, seq_lens, num_splits, block_n, tol=None):
    """Kernel (NaN-poisoned out and workspace) vs the reference evaluated in fp32 on the same values."""
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    workspace = tuple(t.fill_(float("nan")) for t in make_workspace(q, num_splits))
    got = decode_attention(q, k, v, seq_lens, scale, num_splits, out=out, workspace=workspace, block_n=block_n)
    assert got is out
    want = decode_attention_reference(q.float(), k, v, seq_lens, scale)  # fp32 math, fp32 result
    assert torch.isfinite(got).all(), "kernel left NaN in the output (unwritten element or read past seq_lens)"
    err = rel_error(got, want)
    assert err <= (tol or TOL[q.dtype]), f"relative error {err:.3g}"
    return got


# (B, Hkv, G, S, D, lens, dtype, num_splits, block_n): GQA 1/4/8, D 64/72/128, lengths on and off the
# block, one split and many, ragged batches, splits past short sequences, fp32/bf16/fp16.
CASES = {
    "mha-D64-one-split-len-on-block": (1, 4, 1, 64, 64, [64], torch.float32, 1, 16),
    "gqa4-D128-3-splits-len-off-block": (2, 2, 4, 100, 128, [100, 37], torch.float32, 3, 16),
    "gqa8-D72-4-splits": (1, 1, 8, 80, 72, [75], torch.float32, 4, 16),
    "ragged-1-17-300-64-8-splits": (4, 2, 4, 300, 64, [1, 17, 300, 64], torch.float32, 8, 32),
    "more-splits-than-blocks": (2, 1, 4, 40, 64, [40, 3], torch.float32, 16, 16),
    "bf16-gqa4-D128-ragged": (3, 2, 4, 96, 128, [96, 1, 50], torch.bfloat16, 4, 16),
    "bf16-gqa8-D72-one-split": (1, 2, 8, 48, 72, [45], torch.bfloat16, 1, 16),
    "fp16-gqa4-D64": (2, 2, 4, 64, 64, [64, 20], torch.float16, 2, 16),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_kernel_matches_reference(case):
    B, Hkv, G, S, D, lens, dtype, num_splits, block_n = case
    seed = hash((B, Hkv, G, S, D, tuple(lens), num_splits)) % 2**31
    check(*make_inputs(B, Hkv, G, S, D, lens, dtype, seed), num_splits=num_splits, block_n=block_n)


def test_split_count_does_not_change_the_result():
    """1, 2, 5, 7 splits of the same inputs agree to fp32 rounding (the merge is exact up to rounding)."""
    q, k, v, seq_lens = make_inputs(2, 2, 4, 200, 64, [200, 131], torch.float32, seed=7)
    outs = [check(q, k, v, seq_lens, num_splits=n, block_n=16) for n in (1, 2, 5, 7)]
    for o in outs[1:]:
        assert rel_error(o, outs[0]) <= 1e-5


def test_long_context_several_splits():
    """4,096+ slots (R-4B head shape per KV head: G=4, D=128), 8 splits of 64-slot tiles."""
    q, k, v, seq_lens = make_inputs(1, 1, 4, 4200, 128, [4133], torch.float32, seed=11)
    check(q, k, v, seq_lens, num_splits=8, block_n=64)


def test_32k_context_bf16():
    """32k slots (the issue's upper length), bf16, 16 splits; the last split is partial."""
    q, k, v, seq_lens = make_inputs(1, 1, 4, 32768, 128, [32763], torch.bfloat16, seed=13)
    check(q, k, v, seq_lens, num_splits=16, block_n=64)


def test_bf16_cache_with_fp32_query():
    """K/V tiles are converted to q's dtype (as the SDPA path's k.to(q.dtype)); the result is fp32."""
    q, k, v, seq_lens = make_inputs(2, 2, 4, 64, 64, [64, 9], torch.float32, seed=3, kv_dtype=torch.bfloat16)
    check(q, k, v, seq_lens, num_splits=2, block_n=16)


def test_defaults_strided_views_and_int64_lengths():
    """A layer view of a [L, B, Hkv, S, D] cache sliced to fewer slots, a transposed q, int64 lengths,
    default num_splits, no out/workspace: what the attention dispatcher passes."""
    gen = torch.Generator().manual_seed(5)
    L, B, Hkv, G, S, D = 2, 2, 2, 4, 48, 64
    cache_k = torch.randn(L, B, Hkv, S, D, generator=gen)
    cache_v = torch.randn(L, B, Hkv, S, D, generator=gen)
    k, v = cache_k[1, :, :, :40], cache_v[1, :, :, :40]  # [B, Hkv, 40, D], not contiguous
    q = torch.randn(Hkv * G, B, D, generator=gen).transpose(0, 1)  # [B, Hq, D], strides (D, B * D, 1)
    assert not k.is_contiguous() and not q.is_contiguous()
    seq_lens = torch.tensor([40, 23], dtype=torch.int64)
    got = decode_attention(q, k, v, seq_lens, 0.3)
    want = decode_attention_reference(q, k, v, seq_lens, 0.3)
    assert got.shape == (B, Hkv * G, D) and got.dtype == q.dtype
    assert rel_error(got, want) <= 1e-5


def test_reference_matches_sdpa():
    """The reference's GQA mapping (head h -> KV head h // G) and masking, checked against SDPA."""
    q, k, v, seq_lens = make_inputs(3, 2, 4, 30, 16, [30, 1, 12], torch.float32, seed=2)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    mask = (torch.arange(30)[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
    want = F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1),
                                          attn_mask=mask, scale=0.2)[:, :, 0]
    assert rel_error(decode_attention_reference(q, k, v, seq_lens, 0.2), want) <= 1e-6
    bf = decode_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), seq_lens, 0.2)
    assert bf.dtype == torch.bfloat16


def test_custom_op_compiles_without_graph_breaks():
    """torch.ops.r4b.decode_attention is opaque to dynamo (fullgraph) and equals the eager call."""
    q, k, v, seq_lens = make_inputs(2, 2, 4, 40, 64, [40, 7], torch.float32, seed=4)

    def step(q, k, v, seq_lens):
        return decode_attention_op(q, k, v, seq_lens, 0.125) + 1

    torch.library.opcheck(torch.ops.r4b.decode_attention.default, (q, k, v, seq_lens, 0.125, 2))  # fake == real
    explained = torch._dynamo.explain(step)(q, k, v, seq_lens)
    assert explained.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, seq_lens)
    assert rel_error(compiled - 1, decode_attention_reference(q, k, v, seq_lens, 0.125)) <= 1e-5


def test_interpreter_when_triton_was_imported_first():
    """A process that imported triton before setting TRITON_INTERPRET (as torch.compile's probe or another
    test module may) still runs the kernel on CPU tensors."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, triton
        from r4b_kernels.decode_attention import decode_attention
        from r4b_kernels.reference import decode_attention_reference
        torch.manual_seed(0)
        q, k, v = torch.randn(1, 4, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
        lens = torch.tensor([33])
        err = (decode_attention(q, k, v, lens, 0.2, 3, block_n=16) - decode_attention_reference(q, k, v, lens, 0.2))
        assert err.abs().max() < 1e-5, err.abs().max()
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_module_imports_without_triton():
    """The dispatcher imports r4b_kernels on machines without Triton: the module loads, says why it is
    unavailable, and the kernel raises a clear error instead of failing at import."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch
        from r4b_kernels import decode_attention as da
        assert not da.is_available("cuda") and "Triton is not importable" in da.unavailable_reason("cuda")
        q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 8, 16)
        try:
            da.decode_attention(q, k, k, torch.tensor([8]), 0.25)
        except RuntimeError as e:
            assert "Triton is not available" in str(e)
            print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_availability_and_split_heuristic(monkeypatch):
    assert is_available("cpu") and unavailable_reason("cpu") is None  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not is_available("cpu")
    assert "not a CUDA device" in unavailable_reason("cpu")
    assert is_available("cuda") == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert default_num_splits(1, 8, 32768, "cpu") == 4
    assert default_num_splits(1, 8, 16, "cpu") == 1  # never more than one split per two tiles


def _error(match, q, k, v, seq_lens, **kwargs):
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, seq_lens, 0.1, **kwargs)


def test_errors():
    q, k, v = torch.randn(2, 6, 64), torch.randn(2, 4, 32, 64), torch.randn(2, 4, 32, 64)
    lens = torch.tensor([32, 5], dtype=torch.int32)
    assert supports(q, k) == "Hq = 6 query heads is not a multiple of Hkv = 4 key/value heads"
    _error("not a multiple", q, k, v, lens)

    q = torch.randn(2, 8, 64)
    assert supports(q, k, v, lens) is None
    _error(r"seq_lens must lie in \[1, S = 32\]", q, k, v, torch.tensor([33, 5]))
    _error(r"seq_lens must lie in \[1, S = 32\]", q, k, v, torch.tensor([0, 5]))
    _error("seq_lens must be int32 or int64", q, k, v, lens.float())
    _error(r"seq_lens must have shape \(2,\)", q, k, v, lens[:1])
    wide = torch.randn(2, 4, 32, 128)
    _error("last dim must be contiguous", q, wide[..., ::2], v, lens)
    _error("last dim must be contiguous", q, k, wide[..., ::2], lens)
    _error("q dtype torch.float64", q.double(), k, v, lens)
    _error("k_cache dtype torch.float64", q, k.double(), v.double(), lens)
    _error("v_cache dtype", q, k, v.half(), lens)
    _error("v_cache shape", q, k, v[:, :, :16], lens)
    _error("differ in batch or head_dim", q[:1], k, v, lens)
    _error(r"q must be \[B, Hq, D\]", q[:, :, None], k, v, lens)
    _error("head_dim 320 exceeds 256", torch.randn(2, 8, 320), torch.randn(2, 4, 8, 320),
           torch.randn(2, 4, 8, 320), lens.clamp(max=8))
    _error("different devices", q, k.to("meta"), v.to("meta"), lens)
    _error("num_splits must be a positive int", q, k, v, lens, num_splits=0)
    _error("block_n must be a power of two", q, k, v, lens, block_n=24)
    _error("out must be", q, k, v, lens, out=torch.empty(2, 8, 64, dtype=torch.float16))
    _error("workspace must be", q, k, v, lens, num_splits=2, workspace=make_workspace(q, 3))


def test_kernels_compile_for_nvidia_gpus(tmp_path):
    """The compiled (non-interpreted) paths, contiguous and paged, built for sm_80 and sm_90 without a GPU
    (Triton's bundled ptxas):
    front-end errors the interpreter tolerates, tensor-core dots on bf16, and shared memory within 99 KiB
    (what consumer GPUs have) at the default launch options. Runs in a clean process: with
    TRITON_INTERPRET=1 at import, Triton's own library is interpreter-only and cannot be compiled."""
    code = textwrap.dedent("""
        import os, inspect
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from r4b_kernels import split_kv

        def build(fn, types, constexprs, arch, aligned):
            names = list(inspect.signature(fn).parameters)
            sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            kernel = triton.compile(ASTSource(triton.jit(fn), sig, constexprs, attrs),
                                    target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
            return kernel.metadata.shared, kernel.asm["ptx"]

        strides = ["stride_qb", "stride_qh", "stride_kblk", "stride_kslot", "stride_kh", "stride_vblk",
                   "stride_vslot", "stride_vh", "stride_ob", "stride_oh"]
        for dt, arch in (("bf16", 90), ("fp32", 80)):
            # the contiguous cache (PAGED=False: no table read, the table pointer a stand-in)
            types = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "BLOCK_TABLE": "*i32", "SEQ_LENS": "*i32",
                     "OUT": "*" + dt, "O_PART": "*fp32", "LSE_PART": "*fp32", "qk_scale": "fp32"}
            const = dict(stride_qd=1, stride_od=1, stride_tb=0, stride_tm=0, G=4, D=128, PAGED=False, PAGE=1,
                         BLOCK_G=16, BLOCK_D=128, BLOCK_N=split_kv.DEFAULT_BLOCK_N, WRITE_OUT=False,
                         IEEE_DOT=dt == "fp32", UPCAST=False)
            shared, ptx = build(split_kv._split_kernel, types, const, arch, list(types)[:8] + strides)
            assert shared <= 99 * 1024, (dt, shared)
            assert ("mma.sync" in ptx) == (dt == "bf16"), dt  # tensor cores for bf16, exact FMA for fp32
            # PAGED=True (16-token blocks): the same tiles, so the same shared memory, dots and
            # 16-byte cp.async copies of K/V rows despite the per-token block lookup
            paged_const = {k: v for k, v in const.items() if k != "stride_tb"}
            paged_const.update(stride_tm=1, PAGED=True, PAGE=16)
            paged_shared, paged_ptx = build(split_kv._split_kernel, types, paged_const, arch,
                                            list(types)[:8] + strides)
            assert paged_shared == shared, (dt, paged_shared, shared)
            assert ("mma.sync" in paged_ptx) == (dt == "bf16"), dt
            copies = "cp.async.cg.shared.global"
            assert paged_ptx.count(copies) == ptx.count(copies) > 0, (dt, paged_ptx.count(copies), ptx.count(copies))
        types = {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": "*bf16"}
        build(split_kv._merge_kernel, types, dict(stride_od=1, D=128, BLOCK_D=128, BLOCK_S=64, CHUNK=16), 90, [])
        print("ok")
    """)
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
