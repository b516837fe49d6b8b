"""The Qwen3 decoder (R-4B's language model), written to match transformers' ``Qwen3ForCausalLM``.

Per layer:  x = x + o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v))     (QK-norm BEFORE RoPE)
            x = x + down_proj(silu(gate_proj(y)) * up_proj(y)),  y = post_attention_layernorm(x)
with RMSNorm (variance in fp32), GQA, full causal attention, no biases (attention_bias=false).

Notation: B batch, T new tokens, S key/value slots, C hidden_size, Hq/Hkv query/key-value heads,
D head_dim, V vocab_size.

Module and parameter names are transformers' own (``model.layers.N.self_attn.q_proj``, ...), so an HF
``Qwen3ForCausalLM`` state dict loads by name. The model keeps no inference state: a ``KVCache`` is
passed into ``forward`` and the model writes into it.

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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.models.attention import AttentionRecorder, attend, attention, attention_probs, decode_attention
from r4b_core.config import TextConfig
from r4b_core.models.hooks import HookPoint
from r4b_core.models.kv_cache import KVCache


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


@dataclass
class AttentionLayout:
    """Everything the layers need to know about this forward's batch layout, computed once.

    mask:      bool [B, 1, T, S] (True = may attend) or None for plain causal attention
    slots:     int64 [B, T] cache slot of each new token (cache only)
    valid:     bool [B, T] which new tokens are real (None = all); padding is never cached
    kv_len:    S, the number of cache slots attended to
    seq_lens:  int32/int64 [B] valid slots per sequence after this step's write (cache only)
    attentions: collects each layer's probabilities (output_attentions=True), else None
    """

    mask: torch.Tensor | None
    slots: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    kv_len: int = 0
    seq_lens: torch.Tensor | None = None
    attentions: AttentionRecorder | None = None


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
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k, v = self.hook_q(apply_rope(q, cos, sin)), self.hook_k(apply_rope(k, cos, sin)), self.hook_v(v)
        # explicit softmax only when someone asked for this layer's probabilities
        explicit = layout.attentions is not None or self.hook_pattern.has_hooks
        mask = layout.mask
        if kv_cache is not None:
            kv_cache.write(self.layer_idx, k, v, layout.slots, layout.valid)
            kv_len = layout.kv_len
            if T == 1 and not explicit:  # the decode step: the cache's backend (SDPA over all slots, or Triton)
                k, v = kv_cache.read(self.layer_idx, kv_len)  # [B, Hkv, S, D]
                out = decode_attention(q[:, :, 0], k, v, layout.seq_lens, self.scale, kv_cache.decode_backend)
                z = self.hook_z(out.reshape(B, 1, self.n_heads, self.head_dim))  # [B, Hq, D] -> [B, 1, Hq, D]
                return self.o_proj(z.reshape(B, 1, self.n_heads * self.head_dim))
            if T == 1:  # explicit decode step: probabilities over the used slots, like transformers' cache
                kv_len = int(layout.seq_lens.max())
                used = torch.arange(kv_len, device=x.device) < layout.seq_lens[:, None]  # [B, S]
                mask = used[:, None, None]  # [B, 1, 1, S]
            k, v = kv_cache.read(self.layer_idx, kv_len)  # [B, Hkv, S, D]
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if explicit:
            probs = self.hook_pattern(attention_probs(q, k, mask, is_causal=True, scale=self.scale))  # [B, Hq, T, S]
            if layout.attentions is not None:
                layout.attentions.add(probs)
            out = attend(probs, v, dropout_p)  # [B, Hq, T, D]
        else:
            out = attention(q, k, v, mask, is_causal=True, scale=self.scale, dropout_p=dropout_p)  # [B, Hq, T, D]
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
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.self_attn(self.input_layernorm(x), cos, sin, layout, kv_cache))
        x = self.hook_resid_mid(x + attn_out)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))


def _positions_and_layout(
    batch: int, n_new: int, device: torch.device, attention_mask: torch.Tensor | None, kv_cache: KVCache | None
) -> tuple[torch.Tensor, AttentionLayout, torch.Tensor | None]:
    """Default RoPE positions [B, T], the attention layout, and the cache's new seq_lens (or None).

    A token's position is the number of real tokens before it (its own sequence's cache included),
    so a left-padded sequence gets the same positions as when it runs alone.
    """
    valid = attention_mask.bool() if attention_mask is not None else None
    if valid is not None and valid.shape != (batch, n_new):
        raise ValueError(f"attention_mask has shape {tuple(valid.shape)}, expected (batch, tokens) = {(batch, n_new)}.")
    if valid is None:
        offsets = torch.arange(n_new, device=device).expand(batch, n_new)  # [B, T]
    else:
        offsets = (valid.long().cumsum(-1) - 1).clamp(min=0)  # padding borrows a neighbour's position
    if kv_cache is None:
        if valid is None:
            return offsets, AttentionLayout(mask=None), None  # plain causal: SDPA's fused path
        causal = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()  # [T, T]
        mask = causal[None] & valid[:, None, :]  # [B, T, T]: causal and key is real
        mask = mask | ~valid[:, :, None]  # padding queries see everything (finite junk, no NaN)
        return offsets, AttentionLayout(mask=mask[:, None]), None

    past = kv_cache.seq_lens.long()  # [B]
    slots = past[:, None] + offsets  # [B, T]
    new_lens = past + (valid.sum(-1) if valid is not None else n_new)
    if not torch.compiler.is_compiling():
        kv_cache.check_capacity(new_lens)
    # prefill (T > 1): attend over the used part of the cache only
    if n_new == 1:  # decode: decode_attention masks by seq_lens itself; shapes stay static
        layout = AttentionLayout(mask=None, slots=slots, valid=valid, kv_len=kv_cache.capacity, seq_lens=new_lens)
        return slots, layout, new_lens
    kv_len = int(new_lens.max())
    if valid is None and kv_len == n_new:  # an empty cache, no padding: plain causal, SDPA skips masked blocks
        return slots, AttentionLayout(mask=None, slots=slots, kv_len=kv_len, seq_lens=new_lens), new_lens
    key_slot = torch.arange(kv_len, device=device)  # [S]
    mask = key_slot[None, None, :] <= slots[:, :, None]  # [B, T, S]: causal in slot space
    if valid is not None:
        mask = mask | ~valid[:, :, None]
    layout = AttentionLayout(mask=mask[:, None], slots=slots, valid=valid, kv_len=kv_len, seq_lens=new_lens)
    return slots, layout, new_lens


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A ValueError naming the first id outside ``0 .. vocab_size - 1`` (or a non-integer dtype). Such an id
    would index past the embedding table: an IndexError on the CPU, a device-side assert that breaks the
    whole CUDA context on a GPU.

    It reads one flag back to the host, so it is skipped while torch.compile traces: the compiled decode
    step stays free of host syncs (its tokens come from sampling over the vocabulary, so they are in range)
    and the prompt is checked by the eager prefill before it. Meta tensors (shape-only runs) are skipped.
    """
    if torch.compiler.is_compiling() or input_ids.device.type == "meta":
        return
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids should be integer token ids (int64); got dtype {input_ids.dtype}.")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"input_ids holds token id {int(input_ids[where])} at position {where}, outside the vocabulary of "
            f"{vocab_size} ids (0..{vocab_size - 1}); was it made by another tokenizer, or padded with -100?"
        )


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
        kv_cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Qwen3ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, C].")
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        if x.ndim != 3 or x.shape[1] == 0:
            raise ValueError(f"expected a non-empty batch [B, T, C] of embeddings, got shape {tuple(x.shape)}.")
        B, T, _ = x.shape
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"kv_cache holds {kv_cache.batch_size} sequences but the input has batch size {B}.")
        x = self.hook_embed(x)
        default_pos, layout, new_lens = _positions_and_layout(B, T, x.device, attention_mask, kv_cache)
        if output_attentions:
            layout.attentions = AttentionRecorder()
        cos, sin = self.rotary_emb(default_pos if position_ids is None else position_ids)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, layout, kv_cache)
            if states is not None:
                states.append(x)
        if kv_cache is not None:
            kv_cache.seq_lens.copy_(new_lens)
        x = self.hook_norm_out(self.norm(x))
        if states is not None:
            states[-1] = x  # transformers 5 (capture_outputs, tie_last_hidden_states): the last entry is normed
        return Qwen3ModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(states) if states is not None else None,
            attentions=tuple(layout.attentions.probs) if layout.attentions is not None else None,
        )


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


class Qwen3ForCausalLM(nn.Module):
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
        kv_cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> CausalLMOutput:
        """``logits_to_keep=n`` computes logits for the last n positions only (0 = all).

        ``output_hidden_states`` / ``output_attentions`` add transformers' fields of the same names
        (see the module docstring); attentions use the explicit softmax path for every layer.
        """
        out = self.model(input_ids, inputs_embeds, position_ids, attention_mask, kv_cache,
                         output_hidden_states, output_attentions)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.hook_logits(self.lm_head(hidden))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        progress: bool = False,
        check_finite: bool = False,
    ) -> "Qwen3ForCausalLM":
        """Load the decoder from a Qwen3 checkpoint (local dir or hub id), or the text side of an R-4B one.

        dtype: a torch dtype, 'float32' / 'bfloat16' / 'float16', or 'auto' (config.json's dtype).
        device: checked before anything is read or downloaded. check_finite: refuse NaN / Inf weights
        (naming the first tensor and its file); one extra pass over the weights.
        """
        from r4b_core.config import text_config_from_dict
        from r4b_core.devices import check_device
        from r4b_weights.loader import check_layer_counts, load_text_weights, open_checkpoint  # the layer below, on use

        device = check_device(device)
        directory, config_path, raw = open_checkpoint(path_or_repo, revision)
        config = text_config_from_dict(raw, source=str(config_path))
        check_layer_counts(directory, config, config_path, raw)  # before building that many layers
        with torch.device("meta"):
            model = cls(config)
        return load_text_weights(model, directory, config_path, raw, dtype, device, progress, check_finite).eval()
