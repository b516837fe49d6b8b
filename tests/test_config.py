"""Config dataclasses: HF keys in and out, both RoPE spellings, presets, and errors that name the key
and the file."""

from __future__ import annotations

import json

import pytest
import transformers

from conftest import hf_qwen3_config
from r4b_core.config import PRESETS, ConfigError, R4BConfig, TextConfig, preset, text_config_from_dict


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    cfg = preset(name)
    d = cfg.to_hf_dict()
    again = R4BConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert again.to_hf_dict() == d


def test_r4b_preset_has_the_spec_shape():
    cfg = preset("r4b")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size) == (2560, 9728, 36, 151936)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rope_theta) == (32, 8, 128, 1e6)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.num_patches) == (1152, 26, 16, 729)
    assert cfg.image_token_index == cfg.image_token_id == 151669
    assert cfg.tie_lm_head is False
    small = preset("small").text_config
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (32, 8, 128)


def test_full_hf_dict_round_trips_exactly():
    d = preset("r4b").to_hf_dict()
    d["text_config"]["some_future_key"] = {"kept": True}
    d["use_image_newline_parameter"] = True
    d["image_token_id"] = d.pop("image_token_index")
    cfg = R4BConfig.from_hf_dict(d)
    assert cfg.image_token_index == 151669
    assert cfg.to_hf_dict() == d


@pytest.mark.parametrize("rope_type", ["default", "linear"])
def test_reads_transformers_own_config_dict(rope_type):
    """Whatever form the installed transformers writes (4.x rope_theta or 5.x rope_parameters)."""
    hf = hf_qwen3_config(rope_theta=123456.0, rope_type=rope_type, factor=2.0).to_dict()
    cfg = TextConfig.from_hf_dict(hf)
    assert cfg.rope_theta == 123456.0 and cfg.rope_type == rope_type
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    assert TextConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_both_rope_forms_mean_the_same():
    base = preset("tiny").text_config.to_hf_dict()
    v4 = dict(base, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}
    a, b = TextConfig.from_hf_dict(v4), TextConfig.from_hf_dict(v5)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling) == (5e5, {"rope_type": "linear", "factor": 4.0})
    assert a.rope_form == "rope_theta" and b.rope_form == "rope_parameters"
    assert "rope_parameters" in b.to_hf_dict() and "rope_theta" not in b.to_hf_dict()
    assert a.to_hf_dict()["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def _write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path / "config.json"


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size"),
        (lambda d: d["vision_config"].pop("patch_size"), "vision_config.patch_size"),
        (lambda d: d.pop("image_grid_pinpoints"), "image_grid_pinpoints"),
        (lambda d: d.pop("image_token_index"), "image_token_index"),
        (lambda d: d.pop("text_config"), "text_config"),
    ],
)
def test_missing_required_key_names_key_and_file(tmp_path, edit, key):
    d = preset("tiny").to_hf_dict()
    edit(d)
    path = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        R4BConfig.from_pretrained(tmp_path)
    assert key in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not implemented"),
        (lambda d: d["text_config"].update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "'dynamic'"),
        (lambda d: d.update(vision_aspect_ratio="crop"), "vision_aspect_ratio"),
        (lambda d: d.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
        (lambda d: d.update(projector_hidden_act="relu"), "projector_hidden_act"),
        (lambda d: d.update(image_grid_pinpoints=[[56, 100]]), "not a multiple of the tile size"),
        (lambda d: d.update(vision_feature_layer=7), "vision_feature_layer"),
        (lambda d: d.update(image_token_id=3), "disagree"),
        (lambda d: d["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda d: d["text_config"].update(use_sliding_window=True), "use_sliding_window"),
        (lambda d: d["text_config"].update(hidden_size="64"), "text_config.hidden_size"),
        (lambda d: d["text_config"].update(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_values_raise_with_key_and_file(tmp_path, edit, needle):
    d = preset("tiny").to_hf_dict()
    edit(d)
    path = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        R4BConfig.from_pretrained(tmp_path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_anyres_forms_accepted():
    for ratio in ("anyres", "anyres_max_9", "anyres_max_4"):
        d = preset("tiny").to_hf_dict()
        d["vision_aspect_ratio"] = ratio
        assert R4BConfig.from_hf_dict(d).vision_aspect_ratio == ratio


def test_lm_head_tie_follows_text_config():
    """transformers 4.5x rule (r4b_spec.md §1.5): text_config.tie_word_embeddings decides, not the top level."""
    d = preset("tiny").to_hf_dict()
    d["tie_word_embeddings"] = True
    d["text_config"]["tie_word_embeddings"] = False
    assert R4BConfig.from_hf_dict(d).tie_lm_head is False
    d["tie_word_embeddings"] = False
    d["text_config"]["tie_word_embeddings"] = True
    assert R4BConfig.from_hf_dict(d).tie_lm_head is True


def test_text_config_from_r4b_or_plain_qwen3():
    r4b = preset("tiny").to_hf_dict()
    assert text_config_from_dict(r4b) == preset("tiny").text_config
    plain = transformers.Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16).to_dict()
    assert text_config_from_dict(plain).vocab_size == 100


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        R4BConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        R4BConfig.from_pretrained(tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
