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
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.attention import attention
from r4b_core.config import VisionConfig


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
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        V, P, _ = x.shape
        shape = (V, P, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [V, H, P, Dh]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = attention(q, k, v, None, is_causal=False, scale=self.scale,
                        dropout_p=self.dropout if self.training else 0.0)  # [V, H, P, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(V, P, -1))


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
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder layers and post_layernorm. ``forward`` returns the features R-4B uses."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, up_to: int | None = None) -> list[torch.Tensor]:
        """transformers' ``hidden_states``: [embeddings, after layer 1, ..., after layer up_to].

        ``up_to`` (default: all layers) stops early, so unused trailing layers cost nothing.
        """
        n_layers = len(self.encoder.layers)
        up_to = n_layers if up_to is None else up_to
        states = [self.embeddings(pixel_values)]
        for layer in self.encoder.layers[:up_to]:
            states.append(layer(states[-1]))
        return states

    def forward(self, pixel_values: torch.Tensor, feature_layer: int | list[int] = -1) -> torch.Tensor:
        """Features [V, P, Dv * n_layers] = hidden_states[feature_layer] (a list is concatenated on the
        channel dim, as transformers does). Index -1 is the last layer's output BEFORE post_layernorm."""
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_states = len(self.encoder.layers) + 1
        indices = [i % n_states for i in layers]  # -1 -> n_states - 1, as Python indexing does
        states = self.hidden_states(pixel_values, up_to=max(indices))
        return torch.cat([states[i] for i in indices], dim=-1)

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final layer's output with post_layernorm (SigLIP's own output; not used by R-4B)."""
        return self.post_layernorm(self.hidden_states(pixel_values)[-1])
