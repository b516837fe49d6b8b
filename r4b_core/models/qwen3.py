"""The Qwen3 decoder (R-4B's language model), written to match transformers' ``Qwen3ForCausalLM``.

Per layer:  x = x + o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v))     (QK-norm BEFORE RoPE)
            x = x + down_proj(silu(gate_proj(y)) * up_proj(y)),  y = post_attention_layernorm(x)
with RMSNorm (variance in fp32), GQA, full causal attention, no biases (attention_bias=false).

Notation: B batch, T new tokens, S key/value slots, C hidden_size, Hq/Hkv query/key-value heads,
D head_dim, V vocab_size.

Module and parameter names are transformers' own (``model.layers.N.self_attn.q_proj``, ...), so an HF
``Qwen3ForCausalLM`` state dict loads by name. The model keeps no inference state: a cache (``AttentionCache``,
r4b_core/models/kv_cache.py) is passed into ``forward``; each layer writes and reads it through
``compute_attention`` (r4b_core/models/attention.py). Input checks run once, in ``Qwen3ForCausalLM.forward``.

Hook points (r4b_core/models/hooks.py; identity modules, no parameters), relative to ``Qwen3ForCausalLM``:
``model.hook_embed`` [B, T, C]; per layer ``model.layers.N.`` + ``hook_resid_pre``, ``hook_attn_out``,
``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post`` [B, T, C] and ``self_attn.`` + ``hook_q``
[B, Hq, T, D], ``hook_k`` / ``hook_v`` [B, Hkv, T, D] (new tokens; q and k after QK-norm and RoPE, before
the cache write), ``hook_pattern`` [B, Hq, T, S], ``hook_z`` [B, T, Hq, D] (before o_proj);
``model.hook_norm_out`` [B, T, C]; ``hook_logits`` [B, T', V].

``output_hidden_states`` / ``output_attentions`` follow transformers 5: hidden_states = (the decoder's
input embeddings, the output of each layer) with the final norm applied to the last entry;
attentions = per layer probabilities [B, Hq, T, S], S = every key attended to (with a KV cache: the
cache slots [0, max(seq_lens)), which for an unpadded batch is transformers' past + new length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.config import TextConfig, text_config_from_dict
from r4b_core.models.attention import compute_attention
from r4b_core.models.cache_interface import AttentionCache, AttentionLayout, AttentionRecorder, uncached_layout
from r4b_core.models.hooks import HookPoint
from r4b_core.models.input_checks import check_decoder_inputs
from r4b_core.models.pretrained import FromPretrained


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` with the statistics in fp32, cast back before the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: TextConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, always computed on the CPU (bit-stable across devices)."""
    d = config.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_scaling["factor"]
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Real cos/sin tables from positions, in fp32, half-split (``rotate_half``) convention."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        # explicit CPU device: stays real even when the model is built under torch.device("meta")
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) / .half() / .to_empty() must not round or blank the frequencies: recompute them
        # in fp32 on whatever device the buffer moved to.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, D] in fp32."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] (fp32, cast to x's dtype as transformers does)."""
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # [B, 1, T, D]
    return x * cos + rotate_half(x) * sin


class Qwen3Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        c, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # per head, over D
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.hook_q = HookPoint()  # [B, Hq, T, D] after QK-norm and RoPE
        self.hook_k = HookPoint()  # [B, Hkv, T, D] after QK-norm and RoPE (new tokens, before the cache write)
        self.hook_v = HookPoint()  # [B, Hkv, T, D]
        self.hook_pattern = HookPoint()  # [B, Hq, T, S] probabilities; attaching here selects the explicit path
        self.hook_z = HookPoint()  # [B, T, Hq, D] per-head outputs before o_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        kv_cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k, v = self.hook_q(apply_rope(q, cos, sin)), self.hook_k(apply_rope(k, cos, sin)), self.hook_v(v)
        out = compute_attention(q, k, v, scale=self.scale, causal=True, pattern_hook=self.hook_pattern,
                                recorder=layout.attentions, dropout_p=self.dropout if self.training else 0.0,
                                layout=layout, cache=kv_cache, layer=self.layer_idx)  # [B, Hq, T, D]
        z = self.hook_z(out.transpose(1, 2))  # [B, T, Hq, D]
        return self.o_proj(z.reshape(B, T, self.n_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block; the unit for activation checkpointing, per-block compile and FSDP2."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [B, T, C] the block's input
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.hook_attn_out = HookPoint()  # [B, T, C] what attention adds to the residual stream
        self.hook_resid_mid = HookPoint()  # [B, T, C] after the attention residual add
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)
        self.hook_mlp_out = HookPoint()  # [B, T, C] what the MLP adds
        self.hook_resid_post = HookPoint()  # [B, T, C] the block's output

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: AttentionLayout,
                kv_cache: AttentionCache | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.self_attn(self.input_layernorm(x), cos, sin, layout, kv_cache))
        x = self.hook_resid_mid(x + attn_out)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))


@dataclass
class Qwen3ModelOutput:
    """transformers' ``BaseModelOutputWithPast`` without the cache (ours is passed in)."""

    last_hidden_state: torch.Tensor  # [B, T, C], after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L + 1 of [B, T, C] (output_hidden_states)
    attentions: tuple[torch.Tensor, ...] | None = None  # L of [B, Hq, T, S] (output_attentions)


class Qwen3Model(nn.Module):
    """Embeddings, decoder layers and the final norm; returns a ``Qwen3ModelOutput``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.hook_embed = HookPoint()  # [B, T, C] the decoder's input (token embeddings or inputs_embeds)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_norm_out = HookPoint()  # [B, T, C] the final norm's output
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Qwen3ModelOutput:
        """Inputs as ``Qwen3ForCausalLM.forward`` checks them (r4b_core/models/input_checks.py)."""
        x = self.hook_embed(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)  # [B, T, C]
        B, T, _ = x.shape
        layout = (kv_cache.plan(attention_mask, T) if kv_cache is not None
                  else uncached_layout(attention_mask, B, T, x.device))
        layout.attentions = AttentionRecorder() if output_attentions else None
        cos, sin = self.rotary_emb(layout.positions if position_ids is None else position_ids)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, layout, kv_cache)
            if states is not None:
                states.append(x)
        if kv_cache is not None:
            kv_cache.commit(layout)
        x = self.hook_norm_out(self.norm(x))
        if states is not None:
            states[-1] = x  # transformers 5 (capture_outputs, tie_last_hidden_states): the last entry is normed
        return Qwen3ModelOutput(last_hidden_state=x, hidden_states=None if states is None else tuple(states),
                                attentions=None if layout.attentions is None else tuple(layout.attentions.probs))


@dataclass
class CausalLMOutput:
    """transformers' ``CausalLMOutputWithPast`` without the cache; None for what was not requested."""

    logits: torch.Tensor  # [B, T', V]
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L + 1 of [B, T, C], last one normed
    attentions: tuple[torch.Tensor, ...] | None = None  # L of [B, Hq, T, S]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy (logits at t predict labels at t+1), fp32, mean over counted tokens."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


class Qwen3ForCausalLM(FromPretrained, nn.Module):
    """The text-only model: ``model`` (Qwen3Model) plus ``lm_head``, usable on its own."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.hook_logits = HookPoint()  # [B, T', V]
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share embed_tokens' weight with lm_head (when config.tie_word_embeddings)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> CausalLMOutput:
        """``logits_to_keep=n`` computes logits for the last n positions only (0 = all); a 1-D index
        tensor keeps those positions, in that order (transformers' convention).

        ``output_hidden_states`` / ``output_attentions`` add transformers' fields of the same names
        (see the module docstring); attentions use the explicit softmax path for every layer.
        """
        check_decoder_inputs(input_ids, inputs_embeds, attention_mask, kv_cache, self.config.vocab_size)
        out = self.model(input_ids, inputs_embeds, position_ids, attention_mask, kv_cache,
                         output_hidden_states, output_attentions)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]  # [B, K, C]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.hook_logits(self.lm_head(hidden))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)

    @classmethod
    def _config_from_hf(cls, raw: dict, source: str) -> TextConfig:
        """The decoder of a Qwen3 checkpoint, or the text side of an R-4B one (``from_pretrained``)."""
        return text_config_from_dict(raw, source=source)
