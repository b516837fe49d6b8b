"""Text-only logits vs transformers' Qwen3ForCausalLM, computed in the same run (fp32, CPU).

The transformers model gets random weights (norms included), is written with save_pretrained, and
read back through r4b's own loader: the parity covers the loader, the config and the decoder.
"""

from __future__ import annotations

import pytest
import torch

from conftest import save_random_hf_qwen3
from r4b_core import Qwen3ForCausalLM
from r4b_core.models import qwen3 as r4b_qwen3
from r4b_core.models.attention import attention

TOL = 1e-4


def _ids(batch: int = 2, length: int = 24, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope_form", ["rope_theta", "rope_parameters"])
def test_logits_match_transformers(tmp_path, n_kv_heads, tie, rope_form):
    hf = save_random_hf_qwen3(tmp_path, n_kv_heads=n_kv_heads, tie=tie, rope_theta=500000.0, rope_form=rope_form)
    ours = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_form == rope_form and ours.config.rope_theta == 500000.0
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = _ids()
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert got.shape == want.shape == (2, 24, 256)
    assert want.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert _max_diff(got, want) <= TOL


def test_linear_rope_scaling_matches_transformers(tmp_path):
    hf = save_random_hf_qwen3(tmp_path, rope_type="linear", factor=4.0)
    ours = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_type == "linear"
    ids = _ids(length=40)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL


def test_loss_matches_transformers(hf_qwen3_dir):
    directory, hf = hf_qwen3_dir
    ours = Qwen3ForCausalLM.from_pretrained(directory)
    ids = _ids()
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        want = hf(input_ids=ids, labels=labels).loss
        got = ours(ids, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5


def test_padded_batch_matches_transformers(hf_qwen3_dir):
    """Left padding with an attention mask: real positions equal transformers' (which also pads)."""
    directory, hf = hf_qwen3_dir
    ours = Qwen3ForCausalLM.from_pretrained(directory)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert _max_diff(got[real], want[real]) <= TOL


def _attention_with_norm_after_rope(self, x, cos, sin, layout, kv_cache=None):
    """A deliberately wrong attention (QK-norm AFTER RoPE) to show the parity test can fail."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q = self.q_norm(r4b_qwen3.apply_rope(q, cos, sin))
    k = self.k_norm(r4b_qwen3.apply_rope(k, cos, sin))
    out = attention(q, k, v, layout.mask, is_causal=True, scale=self.scale)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def test_parity_check_detects_qk_norm_after_rope(hf_qwen3_dir, monkeypatch):
    directory, hf = hf_qwen3_dir
    ours = Qwen3ForCausalLM.from_pretrained(directory)
    monkeypatch.setattr(r4b_qwen3.Qwen3Attention, "forward", _attention_with_norm_after_rope)
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(input_ids=ids).logits) > 100 * TOL


def test_bfloat16_logits_match_transformers_bfloat16(hf_qwen3_dir):
    """Same casts as transformers (RMSNorm stats in fp32, cos/sin cast to the activation dtype)."""
    import transformers

    directory, hf32 = hf_qwen3_dir
    hf16 = transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa")
    ours = Qwen3ForCausalLM.from_pretrained(directory, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids = _ids()
    with torch.no_grad():
        got, want = ours(ids).logits, hf16.eval()(input_ids=ids).logits
        rounding = _max_diff(got, hf32(input_ids=ids).logits)  # what bf16 itself costs
    assert got.dtype == torch.bfloat16
    assert _max_diff(got, want) <= 1e-2 < rounding


def test_rope_frequencies_survive_dtype_casts_and_meta_init():
    """model.to(bfloat16) must not round RoPE's inverse frequencies, nor to_empty() blank them."""
    from r4b_core.config import preset
    from r4b_core.models.qwen3 import rope_inv_freq

    config = preset("tiny").text_config
    exact = rope_inv_freq(config)
    cast = Qwen3ForCausalLM(config).to(torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(cast.model.rotary_emb.inv_freq, exact)
    with torch.device("meta"):
        empty = Qwen3ForCausalLM(config)
    assert torch.equal(empty.to_empty(device="cpu").model.rotary_emb.inv_freq, exact)
