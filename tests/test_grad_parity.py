"""Gradients vs transformers: every parameter's gradient of r4b equals that of transformers' LLaVA-OneVision
with R-4B's projector grafted on (``build_reference_model``), both loaded from the same tiny synthetic
checkpoint and run in this test (fp32, CPU): ||g_r4b - g_ref|| <= 1e-5 * ||g_ref|| for every parameter,
losses within 1e-6 relative (a few float32 ulps: the two models sum in different orders).

One kind of gradient is zero in exact arithmetic: SigLIP's k_proj bias (softmax ignores a shift of a
query's scores that is the same for every key). Both models hold only rounding noise there (~1e-8,
against ~1 for the k_proj weight), whose relative difference means nothing; for those the test asserts
instead that both are below 1e-5 x the norm of the same layer's k_proj weight gradient.
"""

from __future__ import annotations

import re

import pytest
import torch

from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.reference.parity import build_reference_model
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.data import build_training_example, collate
from r4b_weights.names import ours_to_hf
from shapes_data import shape_conversation, shape_example  # scripts/shapes_data.py, on the path via conftest.py

REL_TOL, LOSS_TOL = 1e-5, 1e-6
ZERO_IN_EXACT_ARITHMETIC = re.compile(r"vision_tower\.encoder\.layers\.\d+\.self_attn\.k_proj\.bias")


def reference_names(ours: torch.nn.Module, ref: torch.nn.Module) -> dict[str, str]:
    """Our parameter name -> the reference's, through the checkpoint name table (the reference's vision
    tower may or may not nest ``vision_model.``). Asserts the map is one to one and covers both models."""
    ref_names = dict(ref.named_parameters())
    mapping = {}
    for name, _ in ours.named_parameters():
        hf = ours_to_hf(name)
        candidates = [hf, hf.replace("model.vision_tower.vision_model.", "model.vision_tower.")]
        found = [c for c in candidates if c in ref_names]
        assert found, f"{name} ({hf}) has no reference parameter"
        mapping[name] = found[0]
    assert sorted(mapping.values()) == sorted(ref_names), "the name map must cover every reference parameter once"
    return mapping


def losses_and_gradients(directory, batch: dict, ours: torch.nn.Module | None = None):
    """(our loss, reference loss, {our name: (our grad, reference grad)}) for one forward + backward each."""
    ours = ours if ours is not None else R4BForConditionalGeneration.from_pretrained(directory)
    ref = build_reference_model(directory)
    ours.train(), ref.train()  # attention dropout is 0: train mode only checks nothing depends on it
    our_loss = ours(**batch).loss
    ref_loss = ref(**batch).loss
    our_loss.backward()
    ref_loss.backward()
    ref_params, names = dict(ref.named_parameters()), reference_names(ours, ref)
    grads = {}
    for name, p in ours.named_parameters():
        q = ref_params[names[name]]
        g = p.grad if p.grad is not None else torch.zeros_like(p)  # e.g. post_layernorm: unused by both
        h = q.grad if q.grad is not None else torch.zeros_like(q)
        grads[name] = (g, h)
    return our_loss.item(), ref_loss.item(), grads


def relative_differences(grads: dict) -> dict[str, float]:
    """||g - h|| / ||h|| per parameter (0 when both are exactly zero); see the module docstring for the
    gradients that are zero in exact arithmetic (checked here against their layer's weight gradient)."""
    out = {}
    for name, (g, h) in grads.items():
        if ZERO_IN_EXACT_ARITHMETIC.fullmatch(name):
            scale = grads[name.removesuffix("bias") + "weight"][1].norm().item()
            assert max(g.norm().item(), h.norm().item()) <= 1e-5 * scale, name
            continue
        ref_norm = h.norm().item()
        out[name] = (g - h).norm().item() / ref_norm if ref_norm else float((g != 0).any())
    return out


def image_batch(tiny_processor, examples):
    return collate([build_training_example(tiny_processor, m, imgs) for m, imgs in examples], tiny_processor.pad_token_id)


def test_gradients_match_transformers_for_an_image_prompt(tiny_checkpoint, tiny_processor):
    image, answer = shape_example(0, seed=1, size=150)  # 150 x 150: base view + 2 x 2 tiles, newlines packed
    batch = image_batch(tiny_processor, [(shape_conversation(answer), [image])])
    assert (batch["labels"] != -100).sum() >= 3 and batch["pixel_values"].shape[1] == 5
    ours_loss, ref_loss, grads = losses_and_gradients(tiny_checkpoint, batch)
    assert abs(ours_loss - ref_loss) <= LOSS_TOL * abs(ref_loss)
    rel = relative_differences(grads)
    worst = max(rel, key=rel.get)
    assert rel[worst] <= REL_TOL, f"{worst}: relative gradient difference {rel[worst]:.2e}"
    # the gradients carry information everywhere a loss can reach: vision, projector, newline, decoder, head
    unused = {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}
    zero = {n for n, (g, _) in grads.items() if g.abs().max() == 0}
    assert zero == unused


def test_gradients_match_transformers_for_a_padded_batch(tiny_checkpoint, tiny_processor):
    """Right padding, a text-only example and a two-image example in one batch (batch_num_images [1, 2, 0])."""
    a, b, c = (shape_example(i, seed=2, size=s) for i, s in ((1, 90), (2, 60), (3, 70)))
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                               {"type": "text", "text": "Name both shapes."}]},
                  {"role": "assistant", "content": f"{b[1]} and {c[1]}"}]
    text_only = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}]
    batch = image_batch(tiny_processor, [(shape_conversation(a[1]), [a[0]]), (two_images, [b[0], c[0]]), (text_only, None)])
    assert batch["batch_num_images"].tolist() == [1, 2, 0] and not batch["attention_mask"].all()
    ours_loss, ref_loss, grads = losses_and_gradients(tiny_checkpoint, batch)
    assert abs(ours_loss - ref_loss) <= LOSS_TOL * abs(ref_loss)
    rel = relative_differences(grads)
    worst = max(rel, key=rel.get)
    assert rel[worst] <= REL_TOL, f"{worst}: relative gradient difference {rel[worst]:.2e}"


def test_the_gradient_check_sees_a_small_divergence(tiny_checkpoint, tiny_processor):
    """The check can fail: the other GELU variant (tanh vs erf) in one ViT block's MLP is caught."""
    image, answer = shape_example(0, seed=1, size=150)
    batch = image_batch(tiny_processor, [(shape_conversation(answer), [image])])
    ours = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    mlp = ours.vision_tower.encoder.layers[1].mlp
    mlp.approximate = "none" if mlp.approximate == "tanh" else "tanh"
    _, _, grads = losses_and_gradients(tiny_checkpoint, batch, ours)
    assert max(relative_differences(grads).values()) > REL_TOL
