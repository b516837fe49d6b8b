"""Shared helpers: random-weight transformers Qwen3 checkpoints written with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter, norms included (unit norm weights would hide QK-norm order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.15 * noise)


def hf_qwen3_config(n_kv_heads: int = 2, tie: bool = False, rope_theta: float = 10000.0,
                    rope_type: str = "default", factor: float = 2.0, **overrides) -> transformers.Qwen3Config:
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=16, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="sdpa")
    kwargs.update(overrides)
    if TRANSFORMERS_5:
        params = {"rope_type": rope_type, "rope_theta": rope_theta}
        if rope_type == "linear":
            params["factor"] = factor
        kwargs["rope_parameters"] = params
    else:
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = {"rope_type": rope_type, "factor": factor} if rope_type != "default" else None
    return transformers.Qwen3Config(**kwargs)


def rewrite_rope_form(config_path: Path, form: str) -> None:
    """Rewrite config.json's RoPE keys as transformers 4.x ("rope_theta") or 5.x ("rope_parameters") does."""
    d = json.loads(config_path.read_text())
    if "rope_parameters" in d and d["rope_parameters"] is not None:
        params = dict(d.pop("rope_parameters"))
    else:
        params = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
        params["rope_theta"] = d.pop("rope_theta", 10000.0)
    d.pop("rope_scaling", None)
    d.pop("rope_theta", None)
    if form == "rope_parameters":
        d["rope_parameters"] = params
    else:
        d["rope_theta"] = params.pop("rope_theta")
        params.setdefault("rope_type", "default")
        d["rope_scaling"] = None if params == {"rope_type": "default"} else params
    config_path.write_text(json.dumps(d, indent=2))


def save_random_hf_qwen3(directory: Path, seed: int = 0, rope_form: str | None = None, **config_kwargs):
    """Build transformers' Qwen3ForCausalLM with random weights, save_pretrained it; return the model."""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_qwen3_config(**config_kwargs)).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    if rope_form is not None:
        rewrite_rope_form(Path(directory) / "config.json", rope_form)
    return model


@pytest.fixture
def hf_qwen3_dir(tmp_path):
    """(directory, transformers model) for a default random tiny Qwen3 (GQA 2, untied)."""
    model = save_random_hf_qwen3(tmp_path / "qwen3")
    return tmp_path / "qwen3", model


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Noise plus shapes: content that is not flat."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if min(width, height) >= 8:
        draw = ImageDraw.Draw(img)
        draw.ellipse([width // 5, height // 5, width // 2, height // 2], fill=(250, 20, 20))
        draw.rectangle([width // 2, height // 3, width - 2, height - 2], fill=(10, 200, 40))
    return img
