"""Synthetic checkpoints: R-4B's exact HF layout, non-degenerate logits, and the full model's
checkpoint I/O (round trip, legacy spelling, errors that name vision-side keys)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from r4b_core.cli import main
from r4b_core.config import preset
from r4b_core.processing.image_processing import ImageProcessorConfig
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.reference.parity import build_reference_model
from r4b_core.reference.synthetic import make_synthetic_checkpoint
from r4b_weights import ConfigMismatchError, MissingTensorError, save_hf_checkpoint


def spec_tensor_names(n_text: int, n_vision: int) -> set[str]:
    """r4b_spec.md §1.6, written out by hand (independent of r4b_weights/names.py)."""
    names = {"model.language_model.embed_tokens.weight", "model.language_model.norm.weight", "lm_head.weight",
             "model.image_newline"}
    for i in range(n_text):
        p = f"model.language_model.layers.{i}."
        names |= {p + s for s in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                  "input_layernorm.weight", "post_attention_layernorm.weight")}
    v = "model.vision_tower.vision_model."
    names |= {v + "embeddings.patch_embedding.weight", v + "embeddings.patch_embedding.bias",
              v + "embeddings.position_embedding.weight", v + "post_layernorm.weight", v + "post_layernorm.bias"}
    for i in range(n_vision):
        p = f"{v}encoder.layers.{i}."
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"{p}{module}.weight", f"{p}{module}.bias"}
    for module in ("pre_norm", "linear_1", "linear_2"):
        names |= {f"model.multi_modal_projector.{module}.weight", f"model.multi_modal_projector.{module}.bias"}
    return names


def test_files_and_tensor_names_follow_r4b_layout(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["RForConditionalGeneration"]
    for key in ("text_config", "vision_config", "image_grid_pinpoints", "vision_aspect_ratio", "image_token_index",
                "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        assert key in config
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    cfg = preset("tiny")
    assert set(tensors) == spec_tensor_names(cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers)
    assert tensors["lm_head.weight"].shape == (151936, 64)
    assert ImageProcessorConfig.from_pretrained(tiny_checkpoint) == ImageProcessorConfig.for_model(cfg)


def test_tokenizer_files_put_special_tokens_at_qwen_ids(tiny_checkpoint):
    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    ids = tok.encode("<|im_start|>user\n<image>What colour?<think>hm</think><|im_end|>").ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert 151669 in ids and 151667 in ids and 151668 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat colour?<think>hm</think>"
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert hf_tok("<image>")["input_ids"] == [151669] and hf_tok.eos_token_id == 151645


@torch.no_grad()
def test_logits_are_not_degenerate(tiny_checkpoint):
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 151936, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    vocab = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).get_vocab(with_added_tokens=True)
    printable = torch.tensor(sorted(i for i in vocab.values() if i != model.config.image_token_index))
    on_vocab = logits[..., printable]
    assert on_vocab.std(-1).min() > 0.5  # every position has spread-out logits over printable tokens
    assert set(logits.argmax(-1).flatten().tolist()) <= set(printable.tolist())  # greedy text is printable
    assert len(set(logits.argmax(-1).flatten().tolist())) > 32  # predictions vary with the input
    probs = logits.softmax(-1)
    assert probs.max() < 0.999  # not one-hot
    assert probs[..., printable].sum(-1).mean() > 0.5  # sampling mostly gives printable tokens too
    from r4b_core.models.anyres import num_image_tokens, num_views

    cfg, size = model.config, (56, 56)
    views = num_views(size, cfg.image_grid_pinpoints, 56)
    pixels = torch.randn(1, views, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    n = num_image_tokens(size, cfg)
    img_ids = torch.cat([ids[:1, :4], torch.full((1, n), cfg.image_token_index), ids[:1, 4:12]], dim=1)
    with_image = model(img_ids, pixel_values=pixels, image_sizes=torch.tensor([size])).logits
    other_image = model(img_ids, pixel_values=-pixels, image_sizes=torch.tensor([size])).logits
    assert (with_image[0, -1] - other_image[0, -1]).abs().max() > 0.1  # the picture matters


def test_seed_decides_the_weights(tmp_path, tiny_checkpoint):
    a = load_file(str(tiny_checkpoint / "model.safetensors"))  # seed 0
    b = load_file(str(make_synthetic_checkpoint(tmp_path / "b", "tiny", seed=0) / "model.safetensors"))
    c = load_file(str(make_synthetic_checkpoint(tmp_path / "c", "tiny", seed=1) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.language_model.layers.0.self_attn.q_proj.weight"],
                           c["model.language_model.layers.0.self_attn.q_proj.weight"])


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_checkpoint):
    sharded = make_synthetic_checkpoint(tmp_path, "tiny", seed=0, max_shard_bytes=20 * 1024**2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    a = R4BForConditionalGeneration.from_pretrained(sharded).state_dict()
    b = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_round_trip_is_bit_identical(tmp_path, tiny_checkpoint):
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    save_hf_checkpoint(model, tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(load_file(str(tiny_checkpoint / "model.safetensors")))
    again = R4BForConditionalGeneration.from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the exported config.json as transformers reads it, against the tiny preset's values written out by hand
    import transformers

    exported = transformers.LlavaOnevisionConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    text, vision = exported.text_config, exported.vision_config
    assert (text.model_type, text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
            text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.max_position_embeddings,
            text.rms_norm_eps, text.tie_word_embeddings) == ("qwen3", 151936, 64, 128, 2, 4, 2, 16, 4096, 1e-6, False)
    rope = getattr(text, "rope_parameters", None) or {"rope_theta": text.rope_theta}  # transformers 5.x / 4.x
    assert rope["rope_theta"] == 1e6 and rope.get("rope_type", "default") == "default"
    assert (vision.model_type, vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers,
            vision.num_attention_heads, vision.image_size, vision.patch_size) == (
        "siglip_vision_model", 32, 64, 2, 2, 56, 14)
    assert exported.image_token_index == 151669 and exported.vision_aspect_ratio == "anyres_max_9"
    # R-4B's pinpoints (384-pixel tiles: 1x2, 2x1, 2x2, 3x1, 1x3) on the tiny preset's 56-pixel tiles
    assert exported.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    assert (exported.vision_feature_layer, exported.vision_feature_select_strategy) == (-1, "full")


def _rewrite_tensors(src, dst, rename=lambda n: n, drop=(), replace=None):
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "preprocessor_config.json"):
        (dst / f).write_text((src / f).read_text())
    tensors = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _legacy_name(name: str) -> str:
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if name.startswith(new):
            return old + name[len(new):]
    raise AssertionError(name)


def test_legacy_llava_spelling_and_pooling_head_load(tmp_path, tiny_checkpoint):
    extra = {"vision_tower.vision_model.head.probe": torch.zeros(1, 1, 32)}  # SigLIP pooling head: dropped
    legacy = _rewrite_tensors(tiny_checkpoint, tmp_path / "legacy", rename=_legacy_name, replace=extra)
    a = R4BForConditionalGeneration.from_pretrained(legacy).state_dict()
    b = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_model_errors_name_vision_side_keys(tmp_path, tiny_checkpoint):
    missing = _rewrite_tensors(tiny_checkpoint, tmp_path / "missing", drop={"model.multi_modal_projector.pre_norm.bias"})
    with pytest.raises(MissingTensorError, match="model.multi_modal_projector.pre_norm.bias"):
        R4BForConditionalGeneration.from_pretrained(missing)
    for key, value, message in (("intermediate_size", 48, "vision_config.intermediate_size = 48.*fc1"),
                                ("num_hidden_layers", 3, "vision_config.num_hidden_layers = 3")):
        edited = _rewrite_tensors(tiny_checkpoint, tmp_path / key)
        cfg = json.loads((edited / "config.json").read_text())
        cfg["vision_config"][key] = value
        (edited / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigMismatchError, match=message):
            R4BForConditionalGeneration.from_pretrained(edited)


def test_cli_make_synthetic_then_ours_and_reference_agree(tmp_path, capsys):
    """The acceptance flow: r4b make-synthetic DIR --preset tiny, then both loaders on DIR."""
    assert main(["make-synthetic", str(tmp_path), "--preset", "tiny", "--seed", "3"]) == 0
    ours, ref = R4BForConditionalGeneration.from_pretrained(tmp_path), build_reference_model(tmp_path)
    ids = torch.randint(0, 151936, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-4
    assert main(["inspect", str(tmp_path), "--load"]) == 0
    out = capsys.readouterr().out
    assert "R-4B (RForConditionalGeneration)" in out and "image tokens" in out
