"""R-4B's multimodal projector: ``pre_norm`` LayerNorm -> ``linear_1`` -> GELU (exact, erf) -> ``linear_2``.

Divergence from transformers' LLaVA-OneVision projector: R-4B adds ``pre_norm`` (a LayerNorm over the
vision features, eps 1e-6, with affine parameters) in front of ``linear_1`` (r4b_spec.md §1.6, §4.1;
vLLM's RVLMultiModalProjector hard-codes eps 1e-6, so it is not read from the config).

The input width is config arithmetic (``R4BConfig.projector_input_size``, which the weights loader
checks without importing this module); ``projector_input_size(config)`` here returns the same number.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.config import R4BConfig
from r4b_core.models.hooks import HookPoint

PRE_NORM_EPS = 1e-6


def projector_input_size(config: R4BConfig) -> int:
    """Vision width times the number of feature layers concatenated (``R4BConfig.projector_input_size``)."""
    return config.projector_input_size


class MultiModalProjector(nn.Module):
    """[..., Dv * n_layers] vision features -> [..., C] text embeddings.

    Hook points: ``hook_in`` [V, P, Dv * n_layers] (the selected vision features), ``hook_out`` [V, P, C].
    """

    def __init__(self, config: R4BConfig) -> None:
        super().__init__()
        d_in, d_out = config.projector_input_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.hook_in = HookPoint()
        self.pre_norm = nn.LayerNorm(d_in, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(d_in, d_out, bias=bias)
        self.linear_2 = nn.Linear(d_out, d_out, bias=bias)
        self.hook_out = HookPoint()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.hook_out(self.linear_2(F.gelu(self.linear_1(self.pre_norm(self.hook_in(features))))))
