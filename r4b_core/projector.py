"""R-4B's multimodal projector: ``pre_norm`` LayerNorm -> ``linear_1`` -> GELU (exact, erf) -> ``linear_2``.

Divergence from transformers' LLaVA-OneVision projector: R-4B adds ``pre_norm`` (a LayerNorm over the
vision features, eps 1e-6, with affine parameters) in front of ``linear_1`` (r4b_spec.md §1.6, §4.1;
vLLM's RVLMultiModalProjector hard-codes eps 1e-6, so it is not read from the config).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.config import R4BConfig

PRE_NORM_EPS = 1e-6


def projector_input_size(config: R4BConfig) -> int:
    """Vision width times the number of feature layers concatenated."""
    layers = config.vision_feature_layer
    n_layers = len(layers) if isinstance(layers, list) else 1
    return config.vision_config.hidden_size * n_layers


class MultiModalProjector(nn.Module):
    """[..., Dv * n_layers] vision features -> [..., C] text embeddings."""

    def __init__(self, config: R4BConfig) -> None:
        super().__init__()
        d_in, d_out = projector_input_size(config), config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.pre_norm = nn.LayerNorm(d_in, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(d_in, d_out, bias=bias)
        self.linear_2 = nn.Linear(d_out, d_out, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(features))))
