"""The transformers reference for R-4B, built independently of r4b's model and loader code.

R-4B's own modelling code is remote code that is not public, so the reference is transformers'
in-library ``LlavaOnevisionForConditionalGeneration`` (Qwen3 text config, SigLIP vision config) with
R-4B's projector grafted on (``pre_norm`` LayerNorm in front of ``linear_1``). Its weights are read
with plain ``safetensors.torch.load_file`` from the same checkpoint directory and matched to the
reference's own parameter names; only the ``vision_model.`` nesting of the vision tower is
adapted, since transformers versions disagree on it.

Divergence handled here: stock transformers parses ``vision_aspect_ratio`` with
``int(s.strip("anyres_max_"))`` and crashes on plain ``"anyres"`` (no downscale). The reference is
given ``"anyres_max_<huge>"`` instead, which never downscales: the same semantics.

Requires transformers (the ``parity`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig
from r4b_core.projector import PRE_NORM_EPS, projector_input_size

NO_DOWNSCALE_ASPECT_RATIO = "anyres_max_1000000000"


class GraftedR4BProjector(nn.Module):
    """R-4B's projector in transformers terms: pre_norm -> linear_1 -> GELU(erf) -> linear_2."""

    def __init__(self, config: R4BConfig) -> None:
        super().__init__()
        d_in, d_out = projector_input_size(config), config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(d_in, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(d_in, d_out, bias=config.multimodal_projector_bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_out, d_out, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


def reference_config(config: R4BConfig):
    """A transformers ``LlavaOnevisionConfig`` equivalent to ``config``."""
    import transformers

    text = config.text_config.to_hf_dict()
    text["model_type"] = "qwen3"
    vision = config.vision_config.to_hf_dict()
    vision["model_type"] = "siglip_vision_model"
    vision["vision_use_head"] = False
    ratio = config.vision_aspect_ratio
    return transformers.LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=config.image_token_index,
        image_grid_pinpoints=config.image_grid_pinpoints,
        vision_aspect_ratio=NO_DOWNSCALE_ASPECT_RATIO if ratio == "anyres" else ratio,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        # transformers 4.5x ties from text_config; 5.x from the top level: give both the text value
        tie_word_embeddings=config.tie_lm_head,
        attn_implementation="sdpa",
    )


def _read_checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


def _checkpoint_name(ref_name: str, available: dict[str, torch.Tensor]) -> str | None:
    """The checkpoint spelling of a reference parameter name (vision_model nesting may differ)."""
    candidates = [ref_name]
    tower = "model.vision_tower."
    if ref_name.startswith(tower):
        rest = ref_name[len(tower):]
        candidates += [tower + "vision_model." + rest, tower + rest.removeprefix("vision_model.")]
    return next((c for c in candidates if c in available), None)


def build_reference_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' LLaVA-OneVision with R-4B's projector, loaded from ``checkpoint_dir``'s safetensors."""
    import transformers

    directory = Path(checkpoint_dir)
    config = R4BConfig.from_hf_dict(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    ref = transformers.LlavaOnevisionForConditionalGeneration(reference_config(config))
    ref.model.multi_modal_projector = GraftedR4BProjector(config)
    tensors = _read_checkpoint_tensors(directory)
    state, used = {}, set()
    tied = config.tie_lm_head
    for name in ref.state_dict():
        source = _checkpoint_name(name, tensors)
        if source is None and name == "lm_head.weight" and tied:
            source = _checkpoint_name("model.language_model.embed_tokens.weight", tensors)
        if source is None:
            raise KeyError(f"reference parameter {name!r} has no tensor in {directory}")
        state[name] = tensors[source]
        used.add(source)
    unused = [n for n in tensors if n not in used and ".head." not in n]
    if unused:
        raise KeyError(f"checkpoint tensors the reference does not use: {unused[:8]}")
    ref.load_state_dict(state, strict=True)
    if tied:
        ref.tie_weights()
    return ref.to(dtype).eval()
