"""Named hook points (r4b_core/models/hooks.py) on the tiny synthetic R-4B: identity when nothing or an identity
hook is attached, replacements take effect (and carry gradients), activation patching, errors, removal,
generate(), run_with_cache shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import picture

from r4b_core.models.anyres import num_image_tokens
from r4b_core.generation.generate import generate
from r4b_core.models.hooks import HookPoint, UnknownHookPointError, hook_names, hooks, run_with_cache, run_with_hooks
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.models.r4b import R4BForConditionalGeneration

L0 = "language_model.model.layers.0."
V0 = "vision_tower.encoder.layers.0."


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_batch(tiny_checkpoint, model):
    """One prompt with one 150x90 image: input_ids [1, T], pixel_values, image_sizes."""
    cfg = model.config
    inputs = preprocess_images([[picture(150, 90, 0)]], ImageProcessorConfig.from_pretrained(tiny_checkpoint))
    gen = torch.Generator().manual_seed(0)
    n = num_image_tokens((90, 150), cfg)
    ids = torch.cat([torch.randint(0, 1000, (5,), generator=gen), torch.full((n,), cfg.image_token_index),
                     torch.randint(0, 1000, (6,), generator=gen)])[None]
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}


def text_ids(seed: int, length: int = 14) -> torch.Tensor:
    return torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def test_hook_points_hold_no_parameters_and_the_state_dict_is_unchanged(model):
    points = [m for m in model.modules() if isinstance(m, HookPoint)]
    assert len(points) == len(hook_names(model)) > 0
    assert all(not list(p.parameters()) and not list(p.buffers()) for p in points)
    assert not any("hook_" in key for key in model.state_dict())


def test_identity_hooks_leave_logits_bit_identical(model, image_batch):
    names = [n for n in hook_names(model) if not n.endswith("hook_pattern")]  # patterns switch the kernel path
    seen = set()

    def returns_input(tensor, name):
        seen.add(name)
        return tensor

    with torch.no_grad():
        plain = model(**image_batch).logits
        hooked = run_with_hooks(model, [(name, returns_input) for name in names], **image_batch).logits
        observed = run_with_hooks(model, [(name, lambda t, n: None) for name in names], **image_batch).logits
    assert seen == set(names)  # every hook point fired
    assert torch.equal(plain, hooked) and torch.equal(plain, observed)


def test_zeroing_the_image_features_changes_logits_exactly_as_zero_embeddings_would(model, image_batch):
    ids = image_batch["input_ids"]
    is_image = ids == model.config.image_token_index
    with torch.no_grad():
        plain = model(**image_batch).logits
        zeroed = run_with_hooks(model, [("hook_image_features", lambda t, n: torch.zeros_like(t))],
                                **image_batch).logits
        embeds = model.language_model.model.embed_tokens(ids).masked_fill(is_image[..., None], 0.0)
        manual = model.language_model(inputs_embeds=embeds).logits
    assert (plain - zeroed)[0, -1].abs().max() > 1e-3  # the image reaches the last position's logits
    assert torch.equal(zeroed, manual)


@pytest.mark.parametrize("layer", [0, 1])
def test_patching_resid_post_from_run_a_into_run_b_gives_a_logits(model, layer):
    name = f"language_model.model.layers.{layer}.hook_resid_post"
    run_a, run_b = text_ids(1), text_ids(2)
    with torch.no_grad():
        out_a, cache_a = run_with_cache(model, names=[name], input_ids=run_a)
        out_b = model(run_b)
        patched = run_with_hooks(model, [(name, lambda t, n: cache_a[n])], input_ids=run_b)
    assert not torch.equal(out_a.logits, out_b.logits)
    assert torch.equal(patched.logits, out_a.logits)


def test_unknown_name_lists_close_matches(model):
    close = r"close matches: .*language_model\.model\.layers\.0\.hook_resid_post"
    with pytest.raises(UnknownHookPointError, match=close):
        run_with_cache(model, names=[L0 + "hook_resid_psot"], input_ids=text_ids(0))
    with pytest.raises(ValueError, match="hook_names"):
        with hooks(model, [("no.such.point", lambda t, n: None)]):
            pass
    assert not any(m.has_hooks for m in model.modules() if isinstance(m, HookPoint))


def test_hooks_are_removed_after_an_exception(model):
    def failing(tensor, name):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        run_with_hooks(model, [(L0 + "hook_mlp_out", failing)], input_ids=text_ids(0))
    with pytest.raises(KeyError):
        with hooks(model, [(L0 + "hook_resid_pre", lambda t, n: t), ("hook_inputs_embeds", lambda t, n: t)]):
            assert model.hook_inputs_embeds.has_hooks
            raise KeyError("inside the block")
    assert not any(m.has_hooks for m in model.modules() if isinstance(m, HookPoint))


def test_hooks_on_one_name_compose_in_order(model):
    order = []

    def add_one(tensor, name):
        order.append("add")
        return tensor + 1

    def double(tensor, name):
        order.append("double")
        return tensor * 2

    with torch.no_grad():
        plain = model(text_ids(3)).logits
        both = run_with_hooks(model, [("language_model.hook_logits", add_one), ("language_model.hook_logits", double)],
                              input_ids=text_ids(3)).logits
    assert order == ["add", "double"] and torch.equal(both, (plain + 1) * 2)


def test_gradients_flow_through_a_replacement(model, image_batch):
    scale = torch.ones((), requires_grad=True)
    with hooks(model, [(V0 + "hook_mlp_out", lambda t, n: t * scale), (L0 + "hook_resid_mid", lambda t, n: t * scale)]):
        loss = model(**image_batch, labels=image_batch["input_ids"]).loss
    loss.backward()
    try:
        assert scale.grad is not None and scale.grad.abs() > 0
        patch_weight = model.vision_tower.embeddings.patch_embedding.weight
        assert patch_weight.grad is not None and patch_weight.grad.abs().max() > 0  # through the vision hook
    finally:
        model.zero_grad(set_to_none=True)


def test_replacing_the_attention_pattern_is_used(model):
    """A pattern where every query attends only to itself makes the per-head outputs equal v."""
    attn = L0 + "self_attn."
    eye = lambda t, n: torch.eye(t.shape[-1]).expand_as(t)  # noqa: E731
    with torch.no_grad():
        _, cache = run_with_cache(model, names=[attn + "hook_v", attn + "hook_z"], input_ids=text_ids(4))
        with hooks(model, [(attn + "hook_pattern", eye)]):
            _, patched = run_with_cache(model, names=[attn + "hook_v", attn + "hook_z"], input_ids=text_ids(4))
    heads, kv_heads = patched[attn + "hook_z"].shape[2], patched[attn + "hook_v"].shape[1]
    v = patched[attn + "hook_v"].repeat_interleave(heads // kv_heads, dim=1).transpose(1, 2)  # [B, T, Hq, D]
    assert torch.allclose(patched[attn + "hook_z"], v, atol=1e-6)
    assert not torch.allclose(cache[attn + "hook_z"], v, atol=1e-3)


def test_hooks_around_generate(model):
    forced, calls = 42, []

    def force_token(logits, name):
        calls.append(logits.shape[1])
        bias = torch.zeros(logits.shape[-1])
        bias[forced] = 1e4
        return logits + bias

    ids = text_ids(5, length=9)
    baseline = generate(model, ids, max_new_tokens=6).tokens
    with hooks(model, [("language_model.hook_logits", force_token)]):
        steered = generate(model, ids, max_new_tokens=6).tokens
    assert steered == [[forced] * 6] and baseline != steered
    assert len(calls) == 6  # prefill + 5 cached decode steps
    assert generate(model, ids, max_new_tokens=6).tokens == baseline  # removed on exit


def test_run_with_cache_shapes(model, image_batch):
    cfg, tcfg, vcfg = model.config, model.config.text_config, model.config.vision_config
    with torch.no_grad():
        out, cache = run_with_cache(model, **image_batch)
    assert set(cache) == set(hook_names(model))  # names=None caches every point, each fired
    T = image_batch["input_ids"].shape[1]
    V = sum(model.views_per_image(image_batch["image_sizes"]))
    P, C, Dv = vcfg.num_patches, tcfg.hidden_size, vcfg.hidden_size
    Hq, Hkv, D, Hv = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim, vcfg.num_attention_heads
    n_image = int((image_batch["input_ids"] == cfg.image_token_index).sum())
    d_in = model.multi_modal_projector.pre_norm.normalized_shape[0]  # Dv * number of feature layers
    expected = {
        "vision_tower.hook_embed": (V, P, Dv),
        V0 + "hook_resid_pre": (V, P, Dv), V0 + "hook_attn_out": (V, P, Dv), V0 + "hook_mlp_out": (V, P, Dv),
        V0 + "hook_resid_post": (V, P, Dv), V0 + "self_attn.hook_q": (V, Hv, P, Dv // Hv),
        V0 + "self_attn.hook_pattern": (V, Hv, P, P), V0 + "self_attn.hook_z": (V, P, Hv, Dv // Hv),
        "multi_modal_projector.hook_in": (V, P, d_in), "multi_modal_projector.hook_out": (V, P, C),
        "hook_image_features": (n_image, C), "hook_inputs_embeds": (1, T, C),
        "language_model.model.hook_embed": (1, T, C),
        L0 + "hook_resid_pre": (1, T, C), L0 + "hook_attn_out": (1, T, C), L0 + "hook_resid_mid": (1, T, C),
        L0 + "hook_mlp_out": (1, T, C), L0 + "hook_resid_post": (1, T, C),
        L0 + "self_attn.hook_q": (1, Hq, T, D), L0 + "self_attn.hook_k": (1, Hkv, T, D),
        L0 + "self_attn.hook_v": (1, Hkv, T, D), L0 + "self_attn.hook_pattern": (1, Hq, T, T),
        L0 + "self_attn.hook_z": (1, T, Hq, D),
        "language_model.model.hook_norm_out": (1, T, C), "language_model.hook_logits": (1, T, tcfg.vocab_size),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert all(not t.requires_grad for t in cache.values())  # detach=True by default
    assert torch.equal(cache["language_model.hook_logits"], out.logits)
    pattern = cache[L0 + "self_attn.hook_pattern"][0]  # [Hq, T, T] causal probabilities
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5) and pattern.triu(1).abs().max() == 0
    # a filter selects by name; detach=False keeps the graph
    _, resid = run_with_cache(model, names=lambda n: n.endswith("hook_resid_post"), detach=False,
                              input_ids=image_batch["input_ids"][:, :5])
    assert len(resid) == tcfg.num_hidden_layers and all(t.requires_grad for t in resid.values())


def test_names_are_stable_under_activation_checkpointing(tiny_checkpoint, model):
    from r4b_core.training.model_setup import apply_activation_checkpointing

    wrapped = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    apply_activation_checkpointing(wrapped)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    assert hook_names(wrapped) == hook_names(model)
    with torch.no_grad():
        _, cache = run_with_cache(wrapped, names=[L0 + "hook_resid_post"], input_ids=text_ids(6))
        _, want = run_with_cache(model, names=[L0 + "hook_resid_post"], input_ids=text_ids(6))
    assert torch.equal(cache[L0 + "hook_resid_post"], want[L0 + "hook_resid_post"])
