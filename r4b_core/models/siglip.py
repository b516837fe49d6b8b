"""The SigLIP(2) vision tower, written to match transformers' ``SiglipVisionModel`` (no pooling head).

    pixel_values [V, 3, H, W]
      -> patch_embedding: Conv2d(kernel = stride = patch, no padding)    [V, Dv, H/p, W/p]
      -> flatten to tokens + learned position_embedding                  [V, P, Dv]   (hidden_states[0])
      -> encoder.layers[i]: x + attn(layer_norm1(x)); x + mlp(layer_norm2(x))       (hidden_states[i+1])
      -> post_layernorm (only for ``last_hidden_state``; R-4B's features are taken before it)

Notation: V views (tiles), P patches per view (27 x 27 = 729 for 384 px / 14 px; the Conv2d ignores
the last 384 - 27 * 14 = 6 rows and columns), Dv vision width, H heads, Dh = Dv / H head dim.

Module and parameter names are transformers' (``embeddings.patch_embedding``, ``encoder.layers.N
.self_attn.q_proj``, ``layer_norm1``, ``mlp.fc1``, ``post_layernorm``) without the ``vision_model.``
wrapper, so the weight table maps both checkpoint spellings onto them.

Hook points (r4b_core/models/hooks.py), relative to the tower: ``hook_embed`` [V, P, Dv]; per layer
``encoder.layers.N.`` + ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
``hook_resid_post`` [V, P, Dv] and ``self_attn.`` + ``hook_q`` / ``hook_k`` / ``hook_v`` [V, H, P, Dh],
``hook_pattern`` [V, H, P, P], ``hook_z`` [V, P, H, Dh].

``forward`` returns a ``SiglipVisionOutput``: R-4B's ``features`` always; with ``output_hidden_states``
/ ``output_attentions`` also transformers' ``SiglipVisionModel`` fields: ``last_hidden_state`` (after
post_layernorm), ``hidden_states`` (embeddings, then each layer, none of them post-normed: SigLIP's
``tie_last_hidden_states=False`` in transformers 5) and ``attentions`` [V, H, P, P] per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.models.attention import compute_attention
from r4b_core.models.cache_interface import AttentionRecorder
from r4b_core.config import VisionConfig
from r4b_core.models.hooks import HookPoint


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
            padding="valid",
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [V, 3, H, W] -> tokens [V, P, Dv]."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [V, Dv, H/p, W/p]
        tokens = patches.flatten(2).transpose(1, 2)  # [V, P, Dv], row-major over the patch grid
        return tokens + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    """Bidirectional multi-head attention with biases on q/k/v/out."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.hook_q = HookPoint()  # [V, H, P, Dh]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_pattern = HookPoint()  # [V, H, P, P] probabilities; attaching here selects the explicit path
        self.hook_z = HookPoint()  # [V, P, H, Dh] per-head outputs before out_proj
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, attentions: AttentionRecorder | None = None) -> torch.Tensor:
        """x [V, P, Dv] -> [V, P, Dv]; ``attentions`` (if given) receives this layer's probabilities."""
        V, P, _ = x.shape
        shape = (V, P, self.n_heads, self.head_dim)
        q = self.hook_q(self.q_proj(x).view(shape).transpose(1, 2))  # [V, H, P, Dh]
        k = self.hook_k(self.k_proj(x).view(shape).transpose(1, 2))
        v = self.hook_v(self.v_proj(x).view(shape).transpose(1, 2))
        out = compute_attention(q, k, v, scale=self.scale, causal=False, pattern_hook=self.hook_pattern,
                                recorder=attentions, dropout_p=self.dropout if self.training else 0.0)  # [V, H, P, Dh]
        z = self.hook_z(out.transpose(1, 2))  # [V, P, H, Dh]
        return self.out_proj(z.reshape(V, P, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm ViT block; the unit for activation checkpointing and FSDP2."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [V, P, Dv] the block's input
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.hook_attn_out = HookPoint()  # [V, P, Dv] what attention adds to the residual stream
        self.hook_resid_mid = HookPoint()  # [V, P, Dv] after the attention residual add
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.hook_mlp_out = HookPoint()  # [V, P, Dv] what the MLP adds
        self.hook_resid_post = HookPoint()  # [V, P, Dv] the block's output

    def forward(self, x: torch.Tensor, attentions: AttentionRecorder | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.self_attn(self.layer_norm1(x), attentions)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.layer_norm2(x))))


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


@dataclass
class SiglipVisionOutput:
    """R-4B's features plus transformers' ``SiglipVisionModel`` fields (None unless requested)."""

    features: torch.Tensor  # [V, P, Dv * n_feature_layers], before post_layernorm
    last_hidden_state: torch.Tensor | None = None  # [V, P, Dv] after post_layernorm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L + 1 of [V, P, Dv]
    attentions: tuple[torch.Tensor, ...] | None = None  # L of [V, H, P, P]


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder layers and post_layernorm. ``forward(...).features`` is what R-4B uses."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.hook_embed = HookPoint()  # [V, P, Dv] patch + position embeddings
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, up_to: int | None = None,
                      attentions: AttentionRecorder | None = None) -> list[torch.Tensor]:
        """transformers' ``hidden_states``: [embeddings, after layer 1, ..., after layer up_to].

        ``up_to`` (default: all layers) stops early, so unused trailing layers cost nothing.
        """
        n_layers = len(self.encoder.layers)
        up_to = n_layers if up_to is None else up_to
        states = [self.hook_embed(self.embeddings(pixel_values))]
        for layer in self.encoder.layers[:up_to]:
            states.append(layer(states[-1], attentions))
        return states

    def forward(
        self,
        pixel_values: torch.Tensor,
        feature_layer: int | list[int] = -1,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SiglipVisionOutput:
        """``features`` [V, P, Dv * n_layers] = hidden_states[feature_layer] (a list is concatenated on the
        channel dim, as transformers does). Index -1 is the last layer's output BEFORE post_layernorm.

        With ``output_hidden_states`` or ``output_attentions`` every layer runs and the transformers
        fields are filled (see the module docstring)."""
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_states = len(self.encoder.layers) + 1
        indices = [i % n_states for i in layers]  # -1 -> n_states - 1, as Python indexing does
        full = output_hidden_states or output_attentions
        recorder = AttentionRecorder() if output_attentions else None
        states = self.hidden_states(pixel_values, up_to=None if full else max(indices), attentions=recorder)
        features = torch.cat([states[i] for i in indices], dim=-1)
        if not full:
            return SiglipVisionOutput(features=features)
        return SiglipVisionOutput(
            features=features,
            last_hidden_state=self.post_layernorm(states[-1]),
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(recorder.probs) if recorder is not None else None,
        )

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final layer's output with post_layernorm (SigLIP's own output; not used by R-4B)."""
        return self.post_layernorm(self.hidden_states(pixel_values)[-1])
