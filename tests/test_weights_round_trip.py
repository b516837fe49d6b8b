"""Checkpoint save/load round trips (single file, sharded, tied, bf16, transformers reading our export,
re-saving), the text model from an R-4B-layout checkpoint, and load_weights / export on a module the
test builds itself. Tiny models in tmp_path, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import r4b_weights
from r4b_core import Qwen3ForCausalLM
from r4b_core.config import TextConfig, preset
from r4b_weights.errors import ConfigMismatchError, CorruptCheckpointError, MissingTensorError
from r4b_weights.export import save_hf_checkpoint

from checkpoint_files import (  # tests/checkpoint_files.py
    INDEX, SINGLE, small_text_config, random_model, saved, file_tensor_names, assert_same_state, rewrite_tensors,
    edit_json,
)


def test_round_trip_single_file(tmp_path):
    d, model = saved(tmp_path / "ckpt")
    assert (d / SINGLE).is_file() and not (d / INDEX).exists()
    assert (d / "config.json").is_file()
    names = file_tensor_names(d)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert "model.layers.2.self_attn.q_norm.weight" in names  # the plain Qwen3 spelling
    loaded = Qwen3ForCausalLM.from_pretrained(d)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert_same_state(loaded, model)
    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_round_trip_sharded(tmp_path):
    d, model = saved(tmp_path / "ckpt", max_shard_bytes=40_000)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (d / SINGLE).exists()
    index = json.loads((d / INDEX).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == {s.name for s in shards}
    for shard in shards:  # the index says where each tensor really is
        for name in load_file(str(shard)):
            assert weight_map[name] == shard.name
    assert set(weight_map) == file_tensor_names(d) == set(model.state_dict())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    loaded = Qwen3ForCausalLM.from_pretrained(d)
    assert_same_state(loaded, model)


def test_round_trip_tied(tmp_path):
    d, model = saved(tmp_path / "ckpt", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    names = file_tensor_names(d)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = Qwen3ForCausalLM.from_pretrained(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert isinstance(loaded.lm_head.weight, torch.nn.Parameter)
    assert_same_state(loaded, model)
    assert len(list(loaded.parameters())) == len(list(model.parameters()))  # shared, not duplicated


def test_tied_config_ignores_a_stored_lm_head_copy(tmp_path):
    """transformers may store a tied lm_head anyway; the loader must accept it and keep the tie."""
    d, model = saved(tmp_path / "ckpt", tie_word_embeddings=True)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    loaded = Qwen3ForCausalLM.from_pretrained(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_load_casts_to_bfloat16(tmp_path):
    d, model = saved(tmp_path / "ckpt")
    loaded = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    params = dict(loaded.named_parameters())
    assert len(params) == len(dict(model.named_parameters()))
    for name, ref in model.named_parameters():
        assert params[name].dtype == torch.bfloat16, name
        assert torch.equal(params[name], ref.detach().to(torch.bfloat16)), name
    with torch.no_grad():
        out = loaded(torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bfloat16_export_round_trips_and_auto_dtype(tmp_path):
    model = random_model().to(torch.bfloat16)
    save_hf_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert_same_state(loaded, model)
    as_fp32 = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype="float32")
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_loads_our_export(tmp_path, tie):
    """The export is a real HF checkpoint: transformers' Qwen3ForCausalLM loads it, same logits."""
    transformers = pytest.importorskip("transformers")
    d, ours = saved(tmp_path / "ckpt", tie_word_embeddings=tie)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings is tie
    assert torch.equal(hf.model.layers[1].mlp.up_proj.weight, ours.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(hf.lm_head.weight, ours.lm_head.weight)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert got.shape == want.shape == (2, 17, 300)
    assert want.abs().max() > 0.5  # not a comparison of near-zero logits
    assert (got - want).abs().max().item() <= 1e-5


def test_resaving_into_the_same_directory_loads_the_new_weights(tmp_path):
    saved(tmp_path, seed=0, max_shard_bytes=40_000)  # an earlier sharded save
    _, newer = saved(tmp_path, seed=1, force=True)  # re-export (single file) into the same directory
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.embed_tokens.weight, newer.model.embed_tokens.weight)
    _, sharded = saved(tmp_path, seed=2, max_shard_bytes=40_000, force=True)  # and back to shards
    assert not (tmp_path / "model.safetensors").exists()
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.embed_tokens.weight, sharded.model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------
# the text model from an R-4B-layout checkpoint


def write_r4b_checkpoint(directory: Path, model: Qwen3ForCausalLM, legacy: bool = False) -> dict:
    """config.json (R-4B, nested text_config) + model.safetensors with R-4B (or legacy LLaVA) names,
    written by hand (not through the name table), plus vision-side tensors the text loader must drop."""
    cfg = preset("tiny")
    cfg.text_config = model.config
    cfg.image_token_index = model.config.vocab_size - 1
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    decoder, head = ("language_model.model.", "language_model.lm_head.") if legacy else ("model.language_model.", "lm_head.")
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("model."):
            tensors[decoder + name[len("model."):]] = t.clone()
        else:
            assert name.startswith("lm_head.")
            tensors[head + name[len("lm_head."):]] = t.clone()
    g = torch.Generator().manual_seed(7)
    vision = ("vision_tower.vision_model." if legacy else "model.vision_tower.vision_model.")
    extra = {
        vision + "embeddings.patch_embedding.weight": torch.randn(32, 3, 14, 14, generator=g),
        vision + "encoder.layers.0.self_attn.out_proj.bias": torch.randn(32, generator=g),
        vision + "head.attention.in_proj_weight": torch.randn(96, 32, generator=g),  # pooling head
        ("" if legacy else "model.") + "multi_modal_projector.linear_1.weight": torch.randn(64, 32, generator=g),
        ("image_newline" if legacy else "model.image_newline"): torch.randn(32, generator=g),
        decoder + "layers.0.self_attn.rotary_emb.inv_freq": torch.randn(4, generator=g),
    }
    tensors.update(extra)
    save_file(tensors, str(directory / SINGLE), metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("legacy", [False, True], ids=["r4b", "llava-legacy"])
def test_text_model_loads_from_r4b_layout(tmp_path, legacy):
    model = random_model(seed=5)
    written = write_r4b_checkpoint(tmp_path, model, legacy=legacy)
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 300 and loaded.config.num_hidden_layers == 3
    prefix = "language_model.model." if legacy else "model.language_model."
    head = "language_model.lm_head.weight" if legacy else "lm_head.weight"
    state = loaded.state_dict()
    assert torch.equal(state["model.layers.1.self_attn.q_norm.weight"], written[prefix + "layers.1.self_attn.q_norm.weight"])
    assert torch.equal(state["lm_head.weight"], written[head])
    assert_same_state(loaded, model)


def test_r4b_layout_errors_use_r4b_names(tmp_path):
    model = random_model(seed=5)
    write_r4b_checkpoint(tmp_path, model)
    rewrite_tensors(tmp_path / SINGLE, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"'model\.language_model\.layers\.1\.mlp\.up_proj\.weight'"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)


def test_r4b_layout_config_mismatch_names_the_text_config_key(tmp_path):
    model = random_model(seed=5)
    write_r4b_checkpoint(tmp_path, model)
    edit_json(tmp_path / "config.json", lambda d: d["text_config"].__setitem__("intermediate_size", 96))
    with pytest.raises(ConfigMismatchError) as e:
        Qwen3ForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "text_config.intermediate_size = 96" in msg
    assert "model.language_model.layers.0.mlp.gate_proj.weight" in msg and "[64, 32]" in msg


def test_two_spellings_of_one_tensor_are_refused(tmp_path):
    d, model = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__("model.language_model.norm.weight", t["model.norm.weight"].clone()))
    with pytest.raises(CorruptCheckpointError, match=r"model\.language_model\.norm\.weight"):
        Qwen3ForCausalLM.from_pretrained(d)


# ---------------------------------------------------------------------------------------------
# loading into a module the caller built, and export from any module's config + state_dict


class TextHeadOnly(torch.nn.Module):
    """Not an r4b model class: a Qwen3-shaped module of the test's own, with a TextConfig."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3ForCausalLM(config).model
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def test_load_weights_fills_a_text_module_built_on_meta(tmp_path):
    d, model = saved(tmp_path / "ckpt")
    directory, config_path, raw = r4b_weights.open_checkpoint(d)
    with torch.device("meta"):
        target = TextHeadOnly(model.config)
    loaded = r4b_weights.load_weights(target, directory, config_path, raw, dtype="float32")
    assert loaded is target
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert_same_state(loaded, model)


def test_loader_checks_the_module_config_type(tmp_path):
    d, model = saved(tmp_path / "ckpt")
    directory, config_path, raw = r4b_weights.open_checkpoint(d)
    with pytest.raises(TypeError, match="model.config is a NoneType; expected the R4BConfig or TextConfig"):
        r4b_weights.load_weights(torch.nn.Linear(2, 2), directory, config_path, raw)


def test_meta_buffer_no_checkpoint_fills_is_refused_before_reading(tmp_path, monkeypatch):
    d, model = saved(tmp_path / "ckpt")
    directory, config_path, raw = r4b_weights.open_checkpoint(d)
    with torch.device("meta"):
        target = TextHeadOnly(model.config)
        target.register_buffer("scratch", torch.zeros(3), persistent=False)

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read before every check had passed")

    monkeypatch.setattr("r4b_weights.loader.iter_tensors", no_reads)
    with pytest.raises(ValueError, match="scratch"):
        r4b_weights.load_weights(target, directory, config_path, raw)


def test_export_takes_the_layout_from_the_config(tmp_path):
    model = random_model(3)
    module = TextHeadOnly(model.config)
    module.load_state_dict(model.state_dict())
    save_hf_checkpoint(module, tmp_path)
    assert "model.layers.0.self_attn.q_proj.weight" in file_tensor_names(tmp_path)
    assert_same_state(Qwen3ForCausalLM.from_pretrained(tmp_path), model)


def test_export_refuses_a_module_without_a_known_config_or_name(tmp_path):
    with pytest.raises(TypeError, match="TextConfig"):
        save_hf_checkpoint(torch.nn.Linear(2, 2), tmp_path / "a")
    module = TextHeadOnly(small_text_config())
    module.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra.weight"):
        save_hf_checkpoint(module, tmp_path / "b")
