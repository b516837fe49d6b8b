"""Training helpers applied from outside the model: freezing, AdamW parameter groups, the summed loss,
activation checkpointing (bit-identical gradients), per-block compile (outputs equal to eager) and
FSDP2 sharding (a one-process gloo group here; the two-process run is in test_train_script.py)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from r4b_core.training.lora import apply_lora
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.model_setup import (
    apply_activation_checkpointing,
    apply_fsdp2,
    canonical_name,
    causal_lm_loss_sum,
    compile_blocks,
    count_parameters,
    count_target_tokens,
    freeze,
    param_groups,
)
from r4b_core.training.data import build_training_example, collate
from r4b_weights.export import save_hf_checkpoint
from shapes_data import shape_conversation, shape_example  # scripts/shapes_data.py, on the path via conftest.py


@pytest.fixture(scope="module")
def batch(tiny_checkpoint):
    processor = R4BProcessor.from_pretrained(tiny_checkpoint)
    examples = []
    for i, size in enumerate((150, 56)):
        image, answer = shape_example(i, seed=0, size=size)
        examples.append(build_training_example(processor, shape_conversation(answer), [image]))
    return collate(examples, processor.pad_token_id)


def load(tiny_checkpoint):
    return R4BForConditionalGeneration.from_pretrained(tiny_checkpoint).train()


def grads_of(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {canonical_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# freezing and parameter groups


def test_freeze_parts(tiny_checkpoint):
    model = load(tiny_checkpoint)
    trainable, total = count_parameters(model)
    assert trainable == total
    freeze(model, vision=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("vision_tower.")}
    freeze(model, vision=False, projector=True, text=True)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == {n for n, _ in model.named_parameters() if n.startswith("vision_tower.")}
    freeze(model, projector=False)  # None leaves the other parts as they are
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_names | {
        n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.") or n == "image_newline"}


def group_names(model, groups):
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_param_groups_exempt_norms_biases_embeddings_and_newline(tiny_checkpoint):
    model = load(tiny_checkpoint)
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = group_names(model, groups)
    assert "image_newline" in no_decay and "language_model.model.embed_tokens.weight" in no_decay
    assert "vision_tower.embeddings.position_embedding.weight" in no_decay
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in no_decay
    assert "multi_modal_projector.pre_norm.weight" in no_decay and "multi_modal_projector.linear_1.bias" in no_decay
    assert all(n.endswith("bias") or "norm" in n or "embed" in n or n == "image_newline" for n in no_decay)
    assert all(n.endswith("weight") and "norm" not in n for n in decay)
    assert "language_model.lm_head.weight" in decay and "vision_tower.embeddings.patch_embedding.weight" in decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay


def test_param_groups_with_a_tied_head_wrappers_frozen_parts_and_lora(tiny_checkpoint):
    model = load(tiny_checkpoint)
    model.language_model.config.tie_word_embeddings = True
    model.language_model.tie_weights()  # lm_head shares the embedding: no decay, counted once
    apply_activation_checkpointing(model)
    freeze(model, vision=True)
    decay, no_decay = group_names(model, param_groups(model, 0.1))
    assert "language_model.model.embed_tokens.weight" in no_decay and "language_model.lm_head.weight" not in decay
    assert not any(n.startswith("vision_tower.") for n in decay | no_decay)
    assert "language_model.model.layers.1.mlp.up_proj.weight" in decay  # through the checkpoint wrapper
    apply_lora(model, rank=2)
    decay, no_decay = group_names(model, param_groups(model, 0.1))
    assert len(decay) == 16 and all(n.endswith(("lora_A", "lora_B")) for n in decay) and not no_decay
    freeze(model, text=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_loss_sum_is_the_model_loss_times_the_token_count(tiny_checkpoint, batch):
    model = load(tiny_checkpoint)
    with torch.no_grad():
        out = model(**batch)
    n = count_target_tokens(batch["labels"])
    assert n > 0
    assert torch.allclose(causal_lm_loss_sum(out.logits, batch["labels"]), out.loss * n, rtol=1e-6)


def test_target_tokens_and_loss_sum_on_hand_made_labels():
    """Counted by hand: logits at t predict labels[t + 1], so nothing predicts a row's first label (the 7)
    and the targets are 5, 6 (row 0) and 8 (row 1). Uniform logits over 10 ids cost log(10) per target."""
    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, -100, 8]])
    assert count_target_tokens(labels) == 3
    assert count_target_tokens(torch.full((2, 4), -100)) == 0
    uniform = torch.zeros(2, 4, 10)
    assert torch.allclose(causal_lm_loss_sum(uniform, labels), 3 * torch.log(torch.tensor(10.0)), rtol=1e-6)
    logits = torch.zeros(2, 4, 10)
    logits[0, 0, 5] = logits[0, 1, 6] = logits[1, 2, 8] = 1e4  # each target predicted with certainty: no loss
    logits[1, 0, 3] = 1e4  # a position whose label is ignored: its (wrong) prediction must not count
    assert causal_lm_loss_sum(logits, labels).item() == 0.0


# ---------------------------------------------------------------------------------------------
# activation checkpointing, compile


def test_activation_checkpointing_gives_identical_gradients_and_recomputes(tiny_checkpoint, batch):
    plain = grads_of(load(tiny_checkpoint), batch)
    model = load(tiny_checkpoint)
    assert apply_activation_checkpointing(model) == 4  # 2 ViT blocks + 2 decoder blocks
    assert apply_activation_checkpointing(model) == 0  # idempotent
    calls = []
    inner = model.language_model.model.layers[0]._checkpoint_wrapped_module
    inner.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation stops early: no post hook)
    checkpointed = grads_of(model, batch)
    assert len(calls) == 2  # forward, then the recomputation in backward
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
    # state_dict keeps the plain names, so export works unchanged
    assert set(model.state_dict()) == set(load(tiny_checkpoint).state_dict())


def test_activation_checkpointed_model_exports(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    apply_activation_checkpointing(model, vision=False)
    save_hf_checkpoint(model, tmp_path)
    reloaded = R4BForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_compile_blocks_matches_eager(tiny_checkpoint, batch):
    """Per-block compile with fullgraph=True (a graph break fails). The aot_eager backend keeps this quick
    (dynamo + AOT autograd, no C++ codegen); test_compile_blocks_inductor below runs the default backend."""
    model = load(tiny_checkpoint)
    with torch.no_grad():
        want = model(**batch).logits
    assert compile_blocks(model, backend="aot_eager") == 4
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in load(tiny_checkpoint).named_parameters()]
    with torch.no_grad():
        got = model(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compile_blocks_inductor(tiny_checkpoint, batch):
    model = load(tiny_checkpoint)
    eager = grads_of(model, batch)
    with torch.no_grad():
        want = model(**batch).logits
    apply_activation_checkpointing(model)
    compile_blocks(model)
    with torch.no_grad():
        got = model(**batch).logits
    assert (got - want).abs().max() <= 1e-4
    compiled = grads_of(model, batch)
    assert all((compiled[n] - eager[n]).norm() <= 1e-4 * eager[n].norm() + 1e-7 for n in eager)


# ---------------------------------------------------------------------------------------------
# FSDP2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_apply_fsdp2_shards_every_block_and_the_root(tiny_checkpoint, batch, one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    plain = grads_of(load(tiny_checkpoint), batch)
    model = load(tiny_checkpoint)
    apply_activation_checkpointing(model)
    apply_fsdp2(model, init_device_mesh("cpu", (1,)))
    blocks = [*model.vision_tower.encoder.layers, *model.language_model.model.layers]
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks)
    assert not isinstance(model.multi_modal_projector, FSDPModule)  # projector, embeddings, head: in the root
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    sharded = {n: g.full_tensor() for n, g in grads_of(model, batch).items()}
    assert sharded.keys() == plain.keys()
    assert all(torch.allclose(sharded[n], plain[n], rtol=1e-5, atol=1e-7) for n in plain)


def test_apply_fsdp2_mixed_precision_argument(tiny_checkpoint):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from r4b_core.training.model_setup import _mixed_precision_policy

    policy = _mixed_precision_policy(torch.bfloat16)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert _mixed_precision_policy(None) == MixedPrecisionPolicy()
    with pytest.raises(TypeError, match="mixed_precision"):
        _mixed_precision_policy("bf16")
