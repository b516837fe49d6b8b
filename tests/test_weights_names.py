"""The HF<->ours name table (r4b_weights/names.py): R-4B, legacy LLaVA and Qwen3 spellings, dropped
tensors, unknown names, and every model parameter through every text layout."""

from __future__ import annotations

import pytest

from r4b_core import Qwen3ForCausalLM
from r4b_weights.names import UnknownTensorName, hf_to_ours, ours_to_hf

from checkpoint_files import small_text_config  # tests/checkpoint_files.py


L = "model.language_model."
V = "model.vision_tower.vision_model."

R4B_NAMES = {
    f"{L}embed_tokens.weight": "language_model.model.embed_tokens.weight",
    f"{L}layers.3.self_attn.q_proj.weight": "language_model.model.layers.3.self_attn.q_proj.weight",
    f"{L}layers.3.self_attn.q_norm.weight": "language_model.model.layers.3.self_attn.q_norm.weight",
    f"{L}layers.3.mlp.down_proj.weight": "language_model.model.layers.3.mlp.down_proj.weight",
    f"{L}norm.weight": "language_model.model.norm.weight",
    "lm_head.weight": "language_model.lm_head.weight",
    f"{V}embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embedding.weight",
    f"{V}embeddings.position_embedding.weight": "vision_tower.embeddings.position_embedding.weight",
    f"{V}encoder.layers.0.self_attn.out_proj.bias": "vision_tower.encoder.layers.0.self_attn.out_proj.bias",
    f"{V}encoder.layers.0.layer_norm1.weight": "vision_tower.encoder.layers.0.layer_norm1.weight",
    f"{V}encoder.layers.0.mlp.fc1.weight": "vision_tower.encoder.layers.0.mlp.fc1.weight",
    f"{V}post_layernorm.weight": "vision_tower.post_layernorm.weight",
    "model.multi_modal_projector.pre_norm.weight": "multi_modal_projector.pre_norm.weight",
    "model.multi_modal_projector.linear_1.weight": "multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_2.bias": "multi_modal_projector.linear_2.bias",
    "model.image_newline": "image_newline",
}

# Other spellings accepted on load: (HF name, our name).
VARIANT_NAMES = [
    ("model.vision_tower.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embedding.weight"),
    ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.encoder.layers.0.mlp.fc1.weight"),
    ("language_model.model.layers.0.self_attn.k_proj.weight", "language_model.model.layers.0.self_attn.k_proj.weight"),
    ("language_model.model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("language_model.lm_head.weight", "language_model.lm_head.weight"),
    ("vision_tower.vision_model.post_layernorm.weight", "vision_tower.post_layernorm.weight"),
    ("vision_tower.vision_model.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embedding.weight"),
    ("vision_tower.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embedding.weight"),
    ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("image_newline", "image_newline"),
    ("model.layers.0.self_attn.v_proj.weight", "language_model.model.layers.0.self_attn.v_proj.weight"),
    ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("model.norm.weight", "language_model.model.norm.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
]

DROPPED_NAMES = [
    "model.vision_tower.vision_model.head.attention.in_proj_weight",
    "model.vision_tower.vision_model.head.probe",
    "model.vision_tower.head.mlp.fc1.weight",
    "vision_tower.vision_model.head.layernorm.weight",
    "model.layers.0.self_attn.rotary_emb.inv_freq",
    "model.language_model.layers.5.self_attn.rotary_emb.inv_freq",
]


@pytest.mark.parametrize("hf, ours", list(R4B_NAMES.items()), ids=list(R4B_NAMES))
def test_r4b_names_map_to_ours_and_back(hf, ours):
    assert hf_to_ours(hf) == ours
    assert ours_to_hf(ours, "r4b") == hf
    assert ours_to_hf(ours) == hf  # r4b is the default layout


@pytest.mark.parametrize("hf, ours", VARIANT_NAMES, ids=[h for h, _ in VARIANT_NAMES])
def test_variant_spellings_map_to_the_same_ours(hf, ours):
    assert hf_to_ours(hf) == ours


@pytest.mark.parametrize("hf", DROPPED_NAMES)
def test_pooling_head_and_inv_freq_are_dropped(hf):
    assert hf_to_ours(hf) is None


@pytest.mark.parametrize("hf", ["foo.bar", "foo.weight", "transformer.h.0.attn.weight", "lm_headx.weight", ""])
def test_unknown_name_raises(hf):
    with pytest.raises(UnknownTensorName):
        hf_to_ours(hf)
    assert issubclass(UnknownTensorName, KeyError)


LEGACY_AND_QWEN3 = [
    ("language_model.model.layers.3.self_attn.q_proj.weight", "llava-legacy", "language_model.model.layers.3.self_attn.q_proj.weight"),
    ("language_model.model.embed_tokens.weight", "llava-legacy", "language_model.model.embed_tokens.weight"),
    ("language_model.lm_head.weight", "llava-legacy", "language_model.lm_head.weight"),
    ("vision_tower.embeddings.patch_embedding.weight", "llava-legacy", "vision_tower.vision_model.embeddings.patch_embedding.weight"),
    ("vision_tower.post_layernorm.weight", "llava-legacy", "vision_tower.vision_model.post_layernorm.weight"),
    ("multi_modal_projector.linear_1.weight", "llava-legacy", "multi_modal_projector.linear_1.weight"),
    ("image_newline", "llava-legacy", "image_newline"),
    ("language_model.model.layers.3.self_attn.q_proj.weight", "qwen3", "model.layers.3.self_attn.q_proj.weight"),
    ("language_model.model.embed_tokens.weight", "qwen3", "model.embed_tokens.weight"),
    ("language_model.model.norm.weight", "qwen3", "model.norm.weight"),
    ("language_model.lm_head.weight", "qwen3", "lm_head.weight"),
]


@pytest.mark.parametrize("ours, layout, hf", LEGACY_AND_QWEN3)
def test_ours_to_hf_legacy_and_qwen3_layouts(ours, layout, hf):
    assert ours_to_hf(ours, layout) == hf
    assert hf_to_ours(hf) == ours  # and back


def test_ours_to_hf_rejects_bad_layout_and_names_without_a_spelling():
    with pytest.raises(ValueError, match="unknown checkpoint layout 'nope'"):
        ours_to_hf("image_newline", "nope")
    with pytest.raises(UnknownTensorName, match="qwen3"):
        ours_to_hf("vision_tower.post_layernorm.weight", "qwen3")  # a text-only layout has no vision tower
    with pytest.raises(UnknownTensorName):
        ours_to_hf("something.else", "r4b")


def test_every_model_parameter_round_trips_through_every_text_layout():
    """All of Qwen3ForCausalLM's state-dict names (as full names) survive ours -> hf -> ours."""
    model = Qwen3ForCausalLM(small_text_config(num_hidden_layers=2))
    names = ["language_model." + n for n in model.state_dict()]
    assert len(names) > 10
    for layout in ("r4b", "llava-legacy", "qwen3"):
        hf_names = [ours_to_hf(n, layout) for n in names]
        assert len(set(hf_names)) == len(names), layout  # no two tensors collapse onto one HF name
        assert [hf_to_ours(h) for h in hf_names] == names, layout
