"""Config dataclasses: HF keys in and out, both RoPE spellings, presets, and errors that name the key
and the file."""

from __future__ import annotations

import json

import pytest
import transformers

from conftest import hf_qwen3_config
from r4b_core.config import PRESETS, ConfigError, R4BConfig, TextConfig, VisionConfig, preset, text_config_from_dict


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
    "edit, needle",
    [  # a missing required key: the message names the key
        (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size"),
        (lambda d: d["vision_config"].pop("patch_size"), "vision_config.patch_size"),
        (lambda d: d.pop("image_grid_pinpoints"), "image_grid_pinpoints"),
        (lambda d: d.pop("image_token_index"), "image_token_index"),
        (lambda d: d.pop("text_config"), "text_config"),
        # an unsupported value: the message names the key or the value
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
def test_missing_keys_and_unsupported_values_raise_naming_key_and_file(tmp_path, edit, needle):
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


# ---------------------------------------------------------------------------------------------
# parsing from the dataclass fields: round trips, kept keys, each default written once

# An R-4B config.json as the checkpoint would hold it (r4b_spec.md §1: LLaVA-OneVision top level, a Qwen3-4B
# text_config as Qwen3's own config.json spells it, a SigLIP vision_config), with keys r4b does not interpret.
R4B_CONFIG_JSON = {
    "architectures": ["RForConditionalGeneration"],
    "auto_map": {"AutoConfig": "configuration_r.RConfig", "AutoModel": "modeling_r.RForConditionalGeneration"},
    "model_type": "r_vl",
    "image_token_index": 151669,
    "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
    "vision_aspect_ratio": "anyres",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
    "use_image_newline_parameter": True,
    "torch_dtype": "bfloat16",
    "text_config": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 40960,
        "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
        "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "attention_dropout": 0.0, "vision_use_head": False,
    },
}


def test_full_r4b_config_json_round_trips(tmp_path):
    """Every key read is written back unchanged (uninterpreted ones included); the only key added is the one
    absent key whose default r4b writes out (Qwen3-4B's config has no pad_token_id)."""
    path = _write(tmp_path, R4B_CONFIG_JSON)
    cfg = R4BConfig.from_pretrained(tmp_path)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_key_value_heads, t.head_dim, t.rope_theta, t.rope_scaling) == (2560, 8, 128, 1e6, None)
    assert (v.hidden_size, v.num_hidden_layers, v.num_patches, v.vision_use_head) == (1152, 26, 729, False)
    assert (cfg.image_token_index, cfg.vision_aspect_ratio, cfg.model_type) == (151669, "anyres", "r_vl")
    assert t.extra == {"architectures": ["Qwen3ForCausalLM"], "initializer_range": 0.02, "max_window_layers": 36,
                       "torch_dtype": "bfloat16", "use_cache": True}
    assert set(cfg.extra) == {"auto_map", "use_image_newline_parameter", "torch_dtype"}
    out = json.loads(json.dumps(cfg.to_hf_dict()))  # JSON-serialisable as is
    original = json.loads(path.read_text())
    assert {k: v for k, v in out.items() if k not in ("text_config", "vision_config")} == {
        k: v for k, v in original.items() if k not in ("text_config", "vision_config")}
    assert out["vision_config"] == original["vision_config"]
    assert out["text_config"] == {**original["text_config"], "pad_token_id": None}
    assert R4BConfig.from_hf_dict(out) == cfg


def test_unknown_keys_are_kept_in_every_section():
    d = preset("tiny").to_hf_dict()
    d["future_top"] = {"nested": [1, 2]}
    d["text_config"]["future_text"] = None
    d["vision_config"]["future_vision"] = "x"
    cfg = R4BConfig.from_hf_dict(d)
    assert cfg.extra == {"future_top": {"nested": [1, 2]}}
    assert cfg.text_config.extra == {"future_text": None} and cfg.vision_config.extra == {"future_vision": "x"}
    out = cfg.to_hf_dict()
    assert out == d
    out["future_top"]["nested"].append(3)  # the written dict is a copy, not the config's own state
    assert cfg.extra == {"future_top": {"nested": [1, 2]}}


def _required_only() -> dict:
    return {
        "image_token_index": 5, "image_grid_pinpoints": [[56, 112]],
        "text_config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4},
        "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
    }


def test_required_keys_only_parse_to_the_documented_defaults():
    """Absent keys take transformers' defaults (Qwen3Config, SiglipVisionConfig, LLaVA-OneVision), written
    out here as literals, and the parser applies exactly the dataclass defaults (no second copy of them)."""
    d = _required_only()
    cfg = R4BConfig.from_hf_dict(d)
    t, v = cfg.text_config, cfg.vision_config
    assert t.num_key_value_heads == 4  # = num_attention_heads: no GQA
    assert (t.head_dim, t.max_position_embeddings, t.rms_norm_eps, t.rope_theta, t.rope_scaling) == (
        128, 32768, 1e-6, 10000.0, None)
    assert (t.hidden_act, t.attention_bias, t.attention_dropout, t.tie_word_embeddings) == ("silu", False, 0.0, False)
    assert (t.use_sliding_window, t.sliding_window, t.bos_token_id, t.eos_token_id, t.pad_token_id) == (
        False, None, None, None, None)
    assert (t.model_type, t.rope_form, t.extra) == ("qwen3", "rope_theta", {})
    assert (v.num_channels, v.hidden_act, v.layer_norm_eps, v.attention_dropout, v.vision_use_head, v.model_type) == (
        3, "gelu_pytorch_tanh", 1e-6, 0.0, None, "siglip_vision_model")
    assert (cfg.vision_aspect_ratio, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (
        "anyres_max_9", -1, "full")
    assert (cfg.projector_hidden_act, cfg.multimodal_projector_bias, cfg.tie_word_embeddings) == ("gelu", True, False)
    assert (cfg.architectures, cfg.model_type, cfg.extra) == (["RForConditionalGeneration"], None, {})
    built = R4BConfig(text_config=TextConfig(**d["text_config"]), vision_config=VisionConfig(**d["vision_config"]),
                      image_token_index=5, image_grid_pinpoints=[[56, 112]])
    assert cfg == built
    # a null value is an absent key: the default again
    nulls = _required_only()
    nulls["text_config"].update(head_dim=None, hidden_act=None, num_key_value_heads=None)
    nulls.update(vision_aspect_ratio=None, architectures=None)
    assert R4BConfig.from_hf_dict(nulls) == cfg


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d["text_config"].update(eos_token_id=["<|im_end|>"]), "text_config.eos_token_id"),
        (lambda d: d["text_config"].update(rms_norm_eps=True), "text_config.rms_norm_eps"),
        (lambda d: d["vision_config"].update(image_size=56.0), "vision_config.image_size"),
        (lambda d: d.update(architectures="RForConditionalGeneration"), "architectures"),
        (lambda d: d.update(vision_feature_layer=[-1, "last"]), "vision_feature_layer"),
        (lambda d: d.update(image_token_index="<image>"), "image_token_index"),
        (lambda d: d.update(image_grid_pinpoints=[[56, 112.0]]), "image_grid_pinpoints"),
        (lambda d: d.update(multimodal_projector_bias="yes"), "multimodal_projector_bias"),
    ],
)
def test_values_are_checked_against_the_field_types(tmp_path, edit, key):
    d = _required_only()
    edit(d)
    path = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        R4BConfig.from_pretrained(tmp_path)
    assert f"'{key}'" in str(e.value) and str(path) in str(e.value)


def test_an_int_is_accepted_where_a_float_is_expected():
    d = _required_only()
    d["text_config"].update(rms_norm_eps=0, rope_theta=500000, attention_dropout=0)
    t = R4BConfig.from_hf_dict(d).text_config
    assert (t.rms_norm_eps, t.rope_theta, t.attention_dropout) == (0.0, 500000.0, 0.0)
    assert all(type(x) is float for x in (t.rms_norm_eps, t.rope_theta, t.attention_dropout))


@pytest.mark.parametrize("keys", [("image_token_index",), ("image_token_id",), ("image_token_index", "image_token_id")])
def test_image_token_key_spelling_is_written_back(keys):
    d = _required_only()
    del d["image_token_index"]
    d.update({k: 7 for k in keys})
    cfg = R4BConfig.from_hf_dict(d)
    assert cfg.image_token_index == cfg.image_token_id == 7
    out = cfg.to_hf_dict()
    assert {k for k in ("image_token_index", "image_token_id") if k in out} == set(keys)
    assert out == R4BConfig.from_hf_dict(out).to_hf_dict()


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("form", ["rope_theta", "rope_parameters"])
def test_presets_round_trip_in_both_rope_spellings(name, form):
    d = preset(name).to_hf_dict()
    if form == "rope_parameters":
        text = d["text_config"]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        del text["rope_scaling"]
    cfg = R4BConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert cfg.to_hf_dict() == d
    assert cfg.text_config.rope_theta == preset(name).text_config.rope_theta and cfg.text_config.rope_form == form


# ---------------------------------------------------------------------------------------------
# one anyres_max_N parser and one pinpoint validator, used by every caller


def test_anyres_max_parser_is_the_one_in_config():
    from r4b_core import config
    from r4b_core.models import anyres

    assert anyres.max_tiles is config.max_tiles
    assert [config.max_tiles(r) for r in ("anyres", "anyres_max_1", "anyres_max_9", "anyres_max_12")] == [None, 1, 9, 12]
    for bad in ("anyres_max_", "anyres_max_0", "anyres_max_-2", "anyres_max_3x", "crop", "", "ANYRES"):
        with pytest.raises(ConfigError, match="anyres_max_N"):
            config.max_tiles(bad)


@pytest.mark.parametrize(
    "pins, needle",
    [
        ([], "non-empty list"),
        ([[56]], "non-empty list"),
        ([[56, 0]], "non-empty list"),
        ([[56, 100]], "pinpoint [56, 100] in 'image_grid_pinpoints' is not a multiple of the tile size 56"),
    ],
)
def test_every_caller_refuses_bad_pinpoints_with_the_same_message(pins, needle):
    from r4b_core.models import anyres
    from r4b_core.processing.image_processing import ImageProcessorConfig

    d = _required_only()
    d["image_grid_pinpoints"] = pins
    messages = []
    for parse in (lambda: R4BConfig.from_hf_dict(d),
                  lambda: ImageProcessorConfig.from_hf_dict({"size": {"height": 56, "width": 56},
                                                             "image_grid_pinpoints": pins}),
                  lambda: anyres.grid_shape((100, 200), pins, 56)):
        with pytest.raises(ValueError) as e:
            parse()
        messages.append(str(e.value).split(": ", 1)[-1])  # without the file prefix
    assert needle in messages[0] and len(set(messages)) == 1, messages
