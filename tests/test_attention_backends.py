"""Attention backend dispatch: the Triton decode kernel (interpreted on the CPU) gives the same greedy
tokens as SDPA; "auto" stays on SDPA off CUDA; a forced backend that cannot run raises."""

from __future__ import annotations

import pytest
import torch

from r4b_core.models.attention import BackendUnavailableError, decode_attention, resolve_decode_backend
from r4b_core.generation.generate import generate
from r4b_core.models.kv_cache import KVCache


def test_triton_backend_greedy_tokens_equal_sdpa(tiny_model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # ragged lengths in the cache
    sdpa = generate(tiny_model, ids, attention_mask=mask, max_new_tokens=12, attention_backend="sdpa")
    cache = KVCache.for_model(tiny_model.config.text_config, 2, 9 + 12, attention_backend="triton")
    assert cache.decode_backend == "triton"
    triton = generate(tiny_model, ids, attention_mask=mask, max_new_tokens=12, kv_cache=cache)
    assert triton.tokens == sdpa.tokens


def test_decode_attention_backends_agree(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, 16, generator=gen)
    k, v = torch.randn(3, 2, 40, 16, generator=gen), torch.randn(3, 2, 40, 16, generator=gen)
    lens = torch.tensor([40, 7, 23])
    k[1, :, 7:], v[1, :, 7:] = 1e4, 1e4  # slots past a sequence's length must not count (SDPA: masked)
    a = decode_attention(q, k, v, lens, 0.25, "sdpa")
    k[1, :, 7:], v[1, :, 7:] = float("nan"), float("nan")  # the kernel must not even read them
    b = decode_attention(q, k, v, lens, 0.25, "triton")
    assert a.abs().max() < 10 and torch.isfinite(b).all() and (a - b).abs().max() <= 1e-5


def test_auto_is_sdpa_off_cuda_and_forced_triton_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_decode_backend("auto", "cpu", torch.float32, 128, 32, 8) == "sdpa"
    assert resolve_decode_backend("triton", "cpu", torch.float32, 128, 32, 8) == "triton"  # interpreted
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="'triton' was requested"):
        resolve_decode_backend("triton", "cpu", torch.float32, 128, 32, 8)
    with pytest.raises(BackendUnavailableError, match="head"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        resolve_decode_backend("triton", "cpu", torch.float32, 512, 32, 8)  # head_dim beyond the kernel
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_decode_backend("flash", "cpu", torch.float32, 128, 32, 8)
