"""Checkpoint I/O (r4b_weights): the HF<->ours name table, save/load round trips, strict loading
errors, and hub/cache resolution. Everything runs on tiny models in tmp_path, CPU only, offline."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import r4b_weights
from r4b_core import Qwen3ForCausalLM
from r4b_core.config import TextConfig, preset
from r4b_weights import (
    CheckpointError,
    ConfigMismatchError,
    CorruptCheckpointError,
    MissingShardError,
    MissingTensorError,
    PickleCheckpointError,
    ShapeMismatchError,
    UnexpectedTensorError,
    hf_to_ours,
    ours_to_hf,
    save_hf_checkpoint,
)
from r4b_weights.hub import HUB_ALLOW_PATTERNS, resolve_checkpoint
from r4b_weights.names import UnknownTensorName

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# helpers


def small_text_config(**overrides) -> TextConfig:
    kwargs = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                  rope_theta=10000.0)
    kwargs.update(overrides)
    return TextConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter, norm weights included (so that 'all ones' can't pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.15 * noise)


def random_model(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(small_text_config(**overrides)).eval()
    randomize_(model, seed)
    return model


def saved(directory: Path, seed: int = 0, max_shard_bytes: int | None = None, force: bool = False, **overrides):
    """(directory, model): a random small model written with save_hf_checkpoint."""
    model = random_model(seed, **overrides)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_hf_checkpoint(model, directory, force=force, **kwargs)
    return directory, model


def file_tensor_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for f in directory.glob("*.safetensors"):
        names |= set(load_file(str(f)).keys())
    return names


def assert_same_state(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def rewrite_tensors(path: Path, edit) -> None:
    """Load a safetensors file, let ``edit(dict)`` change it in place, write it back."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, indent=2))


# ---------------------------------------------------------------------------------------------
# 1. the name table

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


# ---------------------------------------------------------------------------------------------
# 2. save / load round trips


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
# 3. the text model from an R-4B-layout checkpoint


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
# 4. errors


def test_error_hierarchy():
    for cls in (CheckpointError, MissingTensorError, UnexpectedTensorError, ShapeMismatchError,
                ConfigMismatchError, CorruptCheckpointError, PickleCheckpointError, MissingShardError):
        assert issubclass(cls, ValueError), cls
        assert issubclass(cls, CheckpointError), cls
    assert issubclass(MissingShardError, FileNotFoundError)
    assert r4b_weights.MissingShardError is MissingShardError


def test_missing_tensor(tmp_path):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert SINGLE in str(e.value)


def test_missing_lm_head_when_untied(tmp_path):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(MissingTensorError, match=r"'lm_head\.weight'"):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("extra", ["model.layers.0.mlp.extra.weight", "foo.weight"])
def test_unexpected_tensor(tmp_path, extra):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(extra, torch.zeros(4, 4)))
    with pytest.raises(UnexpectedTensorError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert f"'{extra}' (in {SINGLE})" in str(e.value)


def test_unexpected_tensor_names_its_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    extra = "model.layers.0.mlp.extra.weight"
    rewrite_tensors(shard, lambda t: t.__setitem__(extra, torch.zeros(2)))
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__(extra, shard.name))
    with pytest.raises(UnexpectedTensorError, match=rf"'{extra}' \(in {shard.name}\)"):
        Qwen3ForCausalLM.from_pretrained(d)


def test_extra_layer_beyond_config_is_refused(tmp_path):
    d, _ = saved(tmp_path)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__("model.layers.3.mlp.up_proj.weight", t["model.layers.2.mlp.up_proj.weight"].clone()))
    with pytest.raises((ConfigMismatchError, UnexpectedTensorError), match=r"num_hidden_layers|model\.layers\.3"):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("name, bad_shape", [
    ("model.layers.1.mlp.up_proj.weight", (64, 31)),
    ("model.norm.weight", (33,)),
    ("model.layers.2.self_attn.o_proj.weight", (32, 32, 1)),
    ("lm_head.weight", (300, 16)),
])
def test_shape_mismatch(tmp_path, name, bad_shape):
    d, model = saved(tmp_path)
    want = list(model.state_dict()[name].shape)
    rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(name, torch.zeros(bad_shape)))
    with pytest.raises(ShapeMismatchError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert f"'{name}' in {SINGLE} has shape {list(bad_shape)}, expected {want}" in msg


def test_truncated_file(tmp_path):
    d, _ = saved(tmp_path)
    data = (d / SINGLE).read_bytes()
    (d / SINGLE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert str(d / SINGLE) in str(e.value)


def test_truncated_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*-of-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("garbage", [b"this is not a safetensors file at all\n" * 50, bytes(range(256)) * 8, b"",
                                     (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64],
                         ids=["text", "bytes", "empty", "bad-header-json"])
def test_garbage_file(tmp_path, garbage):
    d, _ = saved(tmp_path)
    (d / SINGLE).write_bytes(garbage)
    with pytest.raises(CorruptCheckpointError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert str(d / SINGLE) in str(e.value)


def test_missing_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    with pytest.raises(MissingShardError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    msg = str(e.value)
    assert shards[1].name in msg and INDEX in msg
    assert shards[0].name not in msg
    # also catchable as a plain FileNotFoundError
    with pytest.raises(FileNotFoundError):
        Qwen3ForCausalLM.from_pretrained(d)


class _MakesMarker:
    """Unpickling this creates (opens for writing) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_armed_bin(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _MakesMarker(marker)}, path)


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path):
    # the payload is armed: a real unpickle of an identical file creates its marker
    control_marker = tmp_path / "control-marker"
    _write_armed_bin(tmp_path / "control.bin", control_marker)
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control_marker.exists()

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(small_text_config().to_hf_dict()))
    marker = tmp_path / "marker"
    _write_armed_bin(d / "pytorch_model.bin", marker)
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model\.bin") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert str(d) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_other_pickle_suffixes_are_refused(tmp_path, suffix):
    (tmp_path / "config.json").write_text(json.dumps(small_text_config().to_hf_dict()))
    marker = tmp_path / "marker"
    with open(tmp_path / f"weights{suffix}", "wb") as f:
        pickle.dump(_MakesMarker(marker), f)
    with pytest.raises(PickleCheckpointError, match=f"weights{suffix}"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_text_config().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value, says, tensor", [
    ("hidden_size", 48, "hidden_size = 48", "model.embed_tokens.weight"),
    ("intermediate_size", 96, "intermediate_size = 96", "model.layers.0.mlp.gate_proj.weight"),
    ("vocab_size", 301, "vocab_size = 301", "model.embed_tokens.weight"),
    ("head_dim", 16, "head_dim = 16", "model.layers.0.self_attn.q_norm.weight"),
    ("num_key_value_heads", 4, "num_key_value_heads * head_dim = 32", "model.layers.0.self_attn.k_proj.weight"),
])
def test_config_mismatch_names_key_and_tensor(tmp_path, key, value, says, tensor):
    d, _ = saved(tmp_path)
    edit_json(d / "config.json", lambda c: c.__setitem__(key, value))
    with pytest.raises(ConfigMismatchError) as e:
        Qwen3ForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert says in msg
    assert f"'{tensor}'" in msg and SINGLE in msg
    assert "config.json" in msg


@pytest.mark.parametrize("layers", [2, 4])
def test_config_mismatch_layer_count(tmp_path, layers):
    d, _ = saved(tmp_path)
    edit_json(d / "config.json", lambda c: c.__setitem__("num_hidden_layers", layers))
    with pytest.raises(ConfigMismatchError, match=rf"num_hidden_layers = {layers}, but the checkpoint has layers 0\.\.2"):
        Qwen3ForCausalLM.from_pretrained(d)


def test_index_lists_a_tensor_absent_from_its_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__("model.layers.0.mlp.ghost.weight", shards[0].name))
    with pytest.raises(CorruptCheckpointError, match=r"model\.layers\.0\.mlp\.ghost\.weight") as e:
        Qwen3ForCausalLM.from_pretrained(d)
    assert INDEX in str(e.value)


def test_index_points_a_tensor_at_the_wrong_shard(tmp_path):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    index = json.loads((d / INDEX).read_text())
    name = "model.norm.weight"
    actual = index["weight_map"][name]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != actual)
    edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__(name, other))
    with pytest.raises(CorruptCheckpointError, match=r"model\.norm\.weight"):
        Qwen3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": {"a": 3}}', "[1, 2]"])
def test_malformed_index(tmp_path, content):
    d, _ = saved(tmp_path, max_shard_bytes=40_000)
    (d / INDEX).write_text(content)
    with pytest.raises(CorruptCheckpointError, match=INDEX):
        Qwen3ForCausalLM.from_pretrained(d)


# ---------------------------------------------------------------------------------------------
# 5. hub resolution


@pytest.fixture
def no_network(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"snapshot_download must not be called (args={args}, kwargs={kwargs})")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_local_directory_is_returned_as_is(tmp_path, no_network):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_local_directory_that_looks_like_a_repo_id(tmp_path, monkeypatch, no_network):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    got = resolve_checkpoint("owner/name")
    assert got.resolve() == (tmp_path / "owner" / "name").resolve()


def test_local_checkpoint_loads_without_network(tmp_path, no_network):
    d, model = saved(tmp_path)
    assert_same_state(Qwen3ForCausalLM.from_pretrained(str(d)), model)


@pytest.mark.parametrize("path", ["./nope/dir", "nope/a/b", "~/nope-r4b-test-does-not-exist/x"])
def test_nonexistent_path_raises(tmp_path, monkeypatch, no_network, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint(path)


def test_file_instead_of_directory(tmp_path, no_network):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(NotADirectoryError):
        resolve_checkpoint(f)


def test_revision_with_local_directory(tmp_path, no_network):
    with pytest.raises(ValueError, match="revision='v1'"):
        resolve_checkpoint(tmp_path, revision="v1")
    with pytest.raises(ValueError, match="revision"):
        Qwen3ForCausalLM.from_pretrained(tmp_path, revision="main")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A fake HF cache (HF_HUB_CACHE) holding owner/name at COMMIT, with HF_HUB_OFFLINE=1.

    huggingface_hub reads its env vars at import, so its constants are patched too."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--owner--name"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    return cache, snapshot


def test_offline_hub_id_resolves_to_the_cached_snapshot(offline_cache):
    cache, snapshot = offline_cache
    assert resolve_checkpoint("owner/name").resolve() == snapshot.resolve()
    assert resolve_checkpoint("owner/name", revision=COMMIT).resolve() == snapshot.resolve()


def test_offline_hub_id_loads_the_model_from_the_cache(offline_cache):
    _, snapshot = offline_cache
    _, model = saved(snapshot)
    loaded = Qwen3ForCausalLM.from_pretrained("owner/name")
    assert_same_state(loaded, model)


def test_offline_hub_id_not_in_cache(offline_cache):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as e:
        resolve_checkpoint("someone/missing")
    assert "someone/missing" in str(e.value)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("owner/name", revision="v9")  # repo cached, revision not


class _Spy:
    def __init__(self, result: Path):
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return str(self.result)


def _repo_id(call) -> str:
    args, kwargs = call
    return args[0] if args else kwargs["repo_id"]


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_snapshot_download_arguments(tmp_path, monkeypatch, offline):
    import huggingface_hub

    spy = _Spy(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_checkpoint("YannQi/R-4B", revision="abc123") == tmp_path
    assert resolve_checkpoint("YannQi/R-4B") == tmp_path
    assert len(spy.calls) == 2
    for call, revision in zip(spy.calls, ["abc123", None]):
        _, kwargs = call
        assert _repo_id(call) == "YannQi/R-4B"
        assert kwargs.get("revision") == revision
        patterns = kwargs["allow_patterns"]
        for needed in ("*.safetensors", "config.json", "model.safetensors.index.json"):
            assert needed in patterns
        assert not any(p.endswith((".bin", ".pt", ".pth")) or p in ("*", "*.*") for p in patterns)
        assert kwargs["local_files_only"] is offline
    assert patterns == HUB_ALLOW_PATTERNS


def test_hub_download_failure_becomes_file_not_found(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(*args, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="could not be downloaded") as e:
        resolve_checkpoint("owner/name", revision="v2")
    assert "owner/name" in str(e.value) and "v2" in str(e.value)


def test_unknown_home_directory_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint("~no-such-user-r4b/checkpoint")


def test_pickle_only_directory_without_config_is_refused_as_pickle(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="pytorch_model.bin"):
        Qwen3ForCausalLM.from_pretrained(tmp_path)


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
