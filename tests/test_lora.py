"""LoRA: adapters on chosen Linears, only they train, merging keeps the function, adapter-only files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from r4b_core.training.lora import LoRALinear, apply_lora, load_lora, lora_modules, lora_state_dict, merge_lora, save_lora
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.model_setup import apply_activation_checkpointing, param_groups
from r4b_core.training.data import build_training_example, collate
from r4b_weights.export import save_hf_checkpoint
from shapes_data import shape_conversation, shape_example  # scripts/shapes_data.py, on the path via conftest.py

DECODER_QKVO = {f"language_model.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}


@pytest.fixture(scope="module")
def batch(tiny_checkpoint):
    processor = R4BProcessor.from_pretrained(tiny_checkpoint)
    examples = [build_training_example(processor, shape_conversation(answer), [image])
                for image, answer in (shape_example(i, seed=1, size=100) for i in range(2))]
    return collate(examples, processor.pad_token_id)


def load(tiny_checkpoint):
    return R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def trained_lora_model(tiny_checkpoint, batch, steps=3, **lora_kwargs):
    """A LoRA model after a few AdamW steps (so B != 0)."""
    torch.manual_seed(0)
    model = load(tiny_checkpoint)
    apply_lora(model, **lora_kwargs)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=5e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_apply_lora_wraps_decoder_qkvo_and_only_adapters_train(tiny_checkpoint, batch):
    base = load(tiny_checkpoint)
    model = load(tiny_checkpoint)
    names = apply_lora(model, rank=4, alpha=8)
    assert set(names) == DECODER_QKVO and set(lora_modules(model)) == DECODER_QKVO
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}" for m in DECODER_QKVO for x in "AB"}
    q = model.language_model.model.layers[0].self_attn.q_proj
    # the wrapper holds the base model's own q_proj weight (not a fresh or meta-device one), frozen
    assert isinstance(q, LoRALinear) and q.weight.device.type == "cpu" and not q.weight.requires_grad
    assert torch.equal(q.weight, base.language_model.model.layers[0].self_attn.q_proj.weight)
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4) and q.scaling == 2.0
    assert (q.lora_B == 0).all() and q.lora_A.abs().sum() > 0
    # the base names are unchanged; B = 0 so the adapted model starts as the base model, exactly
    assert set(model.state_dict()) == set(base.state_dict()) | {f"{m}.lora_{x}" for m in DECODER_QKVO for x in "AB"}
    assert torch.equal(logits(model, batch), logits(base, batch))
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert q.lora_B.grad.abs().sum() > 0


def test_merge_gives_the_adapted_models_logits(tiny_checkpoint, batch, tmp_path):
    model = trained_lora_model(tiny_checkpoint, batch)
    q = model.language_model.model.layers[1].self_attn.q_proj
    assert q.lora_B.abs().max() > 1e-3  # training moved B away from zero
    adapted, base = logits(model, batch), logits(load(tiny_checkpoint), batch)
    assert (adapted - base).abs().max() > 1e-2  # the adapters change the function
    assert merge_lora(model) == 8
    assert not lora_modules(model) and type(model.language_model.model.layers[1].self_attn.q_proj) is nn.Linear
    merged = logits(model, batch)
    assert (merged - adapted).abs().max() <= 1e-4 * adapted.abs().max()
    save_hf_checkpoint(model, tmp_path)  # a merged model is a plain model: it exports and reloads
    assert torch.equal(logits(R4BForConditionalGeneration.from_pretrained(tmp_path), batch), merged)


def test_adapter_file_round_trip(tiny_checkpoint, batch, tmp_path):
    model = trained_lora_model(tiny_checkpoint, batch, rank=4, alpha=4)
    path = save_lora(model, tmp_path / "adapter.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model)) and len(f.keys()) == 16  # adapters only
        assert json.loads(f.metadata()["modules"]) == sorted(DECODER_QKVO) and f.metadata()["rank"] == "4"
    fresh = load_lora(load(tiny_checkpoint), path)  # a base model gets the adapters from the file's metadata
    assert torch.equal(logits(fresh, batch), logits(model, batch))
    onto_existing = load(tiny_checkpoint)
    apply_lora(onto_existing, rank=4, alpha=4)
    assert torch.equal(logits(load_lora(onto_existing, path), batch), logits(model, batch))


def test_adapter_file_errors(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    apply_lora(model, rank=2, targets=[r"language_model\.model\.layers\.0\.self_attn\.q_proj"])
    path = save_lora(model, tmp_path / "a.safetensors")
    other_rank = load(tiny_checkpoint)
    apply_lora(other_rank, rank=3, targets=[r"language_model\.model\.layers\.0\.self_attn\.q_proj"])
    with pytest.raises(ValueError, match="shape"):
        load_lora(other_rank, path)
    more = load(tiny_checkpoint)
    apply_lora(more, rank=2)
    with pytest.raises(KeyError, match="missing from the file"):
        load_lora(more, path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "not_adapter.safetensors"))
    with pytest.raises(ValueError, match="not an r4b LoRA adapter"):
        load_lora(load(tiny_checkpoint), tmp_path / "not_adapter.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(load(tiny_checkpoint), tmp_path / "none.safetensors")


def test_targets_errors_and_export_refusal(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    vision = apply_lora(model, targets=[r"vision_tower\.encoder\.layers\.\d+\.mlp\.fc[12]"], freeze_base=False)
    assert len(vision) == 4 and all(p.requires_grad for p in model.parameters())  # the base stays trainable
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, targets=[r"vision_tower\.encoder\.layers\.0\.mlp\.fc1"])
    with pytest.raises(TypeError, match="not an nn.Linear"):
        apply_lora(model, targets=[r"vision_tower\.post_layernorm"])
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(model, targets=[r"nothing"])
    with pytest.raises(ValueError, match="merge_lora"):
        save_hf_checkpoint(model, tmp_path)


def test_lora_through_activation_checkpointing_and_dropout(tiny_checkpoint, batch):
    model = load(tiny_checkpoint)
    apply_activation_checkpointing(model)
    names = apply_lora(model, rank=2, dropout=0.5)
    assert set(names) == DECODER_QKVO  # matched through the wrapper's name parts
    layer = model.language_model.model.layers[0]._checkpoint_wrapped_module.self_attn.v_proj
    assert isinstance(layer, LoRALinear)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # dropout on the adapter's input in training only
    assert torch.allclose(layer.eval()(x), x @ layer.merged_weight().T, atol=1e-5)
