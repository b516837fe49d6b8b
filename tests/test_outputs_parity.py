"""``output_hidden_states`` / ``output_attentions`` and the image outputs vs transformers, computed in the
same test run on the tiny synthetic checkpoint (fp32, CPU).

The references run transformers' eager attention (SDPA cannot return probabilities). Compared: the
decoder's hidden_states (embeddings first, the final norm applied to the last entry) and attentions
[B, H, T, S]; the image features (transformers 5's ``image_outputs.pooler_output``, 4.x's
``image_hidden_states``) and the vision tower's fields; a prefill followed by cached decode steps
against transformers' own cache; the text decoder alone and the SigLIP tower alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import picture

from r4b_core.models.anyres import num_image_tokens
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.models.kv_cache import KVCache
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.reference.parity import build_reference_model, reference_config
from r4b_core.models.qwen3 import Qwen3ForCausalLM

TOL = 1e-5  # hidden states, attention probabilities, image features
LOGIT_TOL = 1e-4  # logits (DESIGN.md: tiny fp32 logits max-abs <= 1e-4)
BOTH = dict(output_hidden_states=True, output_attentions=True)


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint):
    """(checkpoint dir, ours, transformers reference with eager attention)."""
    directory = tiny_checkpoint  # the session's shared one (conftest.py): read-only; the models are this file's own
    ref = build_reference_model(directory)
    ref.set_attn_implementation("eager")
    return directory, R4BForConditionalGeneration.from_pretrained(directory), ref


def prompt_with_images(config, sizes_per_sample, seed=0):
    """Left-padded input_ids [B, T] and attention_mask for samples whose images have these (w, h) sizes."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sizes in sizes_per_sample:
        parts = [torch.randint(0, 1000, (4 + len(rows),), generator=gen)]
        for w, h in sizes:
            n = num_image_tokens((h, w), config, multi_image=len(sizes) > 1)
            parts += [torch.full((n,), config.image_token_index), torch.randint(0, 1000, (3,), generator=gen)]
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def image_inputs(directory, sizes_per_sample, seed=0):
    images = [[picture(w, h, seed + 10 * i + j) for j, (w, h) in enumerate(s)] for i, s in enumerate(sizes_per_sample)]
    return preprocess_images(images, ImageProcessorConfig.from_pretrained(directory))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_decoder_outputs_match(got, want, n_layers, real=None):
    """hidden_states and attentions equal within TOL; ``real`` [B, T] bool restricts to real query tokens."""
    assert len(got.hidden_states) == len(want.hidden_states) == n_layers + 1
    assert len(got.attentions) == len(want.attentions) == n_layers
    for ours, theirs in zip(got.hidden_states, want.hidden_states):
        ours, theirs = (ours, theirs) if real is None else (ours[real], theirs[real])
        assert max_diff(ours, theirs) <= TOL
    for ours, theirs in zip(got.attentions, want.attentions):
        assert ours.shape == theirs.shape
        if real is not None:  # [B, H, T, S] -> [N_real, H, S]: rows of real queries, every key
            ours, theirs = ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real]
        assert max_diff(ours, theirs) <= TOL


def assert_image_outputs_match(got, want):
    ours, theirs = got.image_outputs, want.image_outputs
    assert len(ours.pooler_output) == len(theirs.pooler_output)
    for a, b in zip(ours.pooler_output, theirs.pooler_output):
        assert max_diff(a, b) <= TOL
    assert max_diff(got.image_hidden_states, torch.cat(theirs.pooler_output)) <= TOL  # 4.x's name
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TOL
    # transformers keeps only the vision_feature_layer entries (None elsewhere); ours keeps all of them
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    compared = [i for i, h in enumerate(theirs.hidden_states) if h is not None]
    assert compared
    for i in compared:
        assert max_diff(ours.hidden_states[i], theirs.hidden_states[i]) <= TOL


def test_text_only(tiny_pair):
    _, ours, ref = tiny_pair
    ids = torch.randint(0, 151936, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids, **BOTH), ref(input_ids=ids, **BOTH)
    assert max_diff(got.logits, want.logits) <= LOGIT_TOL
    assert_decoder_outputs_match(got, want, ours.config.text_config.num_hidden_layers)
    assert got.attentions[0].shape == (2, ours.config.text_config.num_attention_heads, 20, 20)
    assert got.image_outputs is None and got.image_hidden_states is None


def test_fields_not_requested_are_none_and_logits_unchanged(tiny_pair):
    directory, ours, _ = tiny_pair
    inputs = image_inputs(directory, [[(150, 90)]])
    ids, _ = prompt_with_images(ours.config, [[(150, 90)]])
    kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        plain = ours(ids, **kwargs)
        hidden_only = ours(ids, output_hidden_states=True, **kwargs)
        both = ours(ids, **BOTH, **kwargs)
    assert plain.hidden_states is None and plain.attentions is None
    assert plain.image_outputs.hidden_states is None and plain.image_outputs.attentions is None
    assert plain.image_outputs.last_hidden_state is None and len(plain.image_outputs.pooler_output) == 1
    assert hidden_only.attentions is None and hidden_only.image_outputs.attentions is None
    assert torch.equal(plain.logits, hidden_only.logits)  # hidden states alone keep the fused attention path
    assert max_diff(plain.logits, both.logits) <= LOGIT_TOL  # the explicit softmax path agrees with SDPA
    for a, b in zip(hidden_only.hidden_states, both.hidden_states):
        assert max_diff(a, b) <= TOL


@pytest.mark.parametrize("sizes_per_sample", [[[(150, 90)]], [[(150, 90), (40, 70)]]], ids=["one_image", "two_images"])
def test_image_prompts(tiny_pair, sizes_per_sample):
    directory, ours, ref = tiny_pair
    inputs = image_inputs(directory, sizes_per_sample)
    ids, _ = prompt_with_images(ours.config, sizes_per_sample)
    kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                  batch_num_images=inputs["batch_num_images"], **BOTH)
    with torch.no_grad():
        got, want = ours(ids, **kwargs), ref(input_ids=ids, **kwargs)
    assert max_diff(got.logits, want.logits) <= LOGIT_TOL
    assert_decoder_outputs_match(got, want, ours.config.text_config.num_hidden_layers)
    assert_image_outputs_match(got, want)
    n_views = sum(ours.views_per_image(inputs["image_sizes"], inputs["batch_num_images"]))
    vcfg = ours.config.vision_config
    assert len(got.image_outputs.attentions) == vcfg.num_hidden_layers
    assert got.image_outputs.attentions[0].shape == (n_views, vcfg.num_attention_heads) + (vcfg.num_patches,) * 2


def test_left_padded_batch_with_different_image_sizes(tiny_pair):
    directory, ours, ref = tiny_pair
    sizes = [[(150, 90)], [(60, 200)]]
    inputs = image_inputs(directory, sizes)
    ids, mask = prompt_with_images(ours.config, sizes)
    assert not mask.bool().all()  # one row is padded
    kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], attention_mask=mask, **BOTH)
    with torch.no_grad():
        got, want = ours(ids, **kwargs), ref(input_ids=ids, **kwargs)
    real = mask.bool()
    assert max_diff(got.logits[real], want.logits[real]) <= LOGIT_TOL
    assert_decoder_outputs_match(got, want, ours.config.text_config.num_hidden_layers, real=real)
    assert_image_outputs_match(got, want)


def _reference_cache(output):
    """transformers 5.24 names the returned cache ``cache`` (``past_key_values`` before)."""
    return getattr(output, "cache", None) or output.past_key_values


def test_prefill_then_cached_decode_steps(tiny_pair):
    directory, ours, ref = tiny_pair
    inputs = image_inputs(directory, [[(120, 80)], [(120, 80)]])
    first, _ = prompt_with_images(ours.config, [[(120, 80)]])
    second = first.clone()  # same layout, other text: no padding in either model's cache
    text = second != ours.config.image_token_index
    second[text] = (second[text] + 17) % 1000
    ids = torch.cat([first, second])  # [2, T]
    prompt_len = ids.shape[1]
    kv = KVCache.for_model(ours.config.text_config, batch_size=2, capacity=prompt_len + 4)
    images = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    n_layers = ours.config.text_config.num_hidden_layers
    with torch.no_grad():
        got = ours(ids, kv_cache=kv, **images, **BOTH)
        want = ref(input_ids=ids, use_cache=True, **images, **BOTH)
        assert_decoder_outputs_match(got, want, n_layers)
        ref_cache = _reference_cache(want)
        steps = torch.randint(0, 1000, (2, 3), generator=torch.Generator().manual_seed(5))
        for step in range(steps.shape[1]):
            token = steps[:, step:step + 1]  # [B, 1] the same next token for both models
            got = ours(token, kv_cache=kv, **BOTH)
            want = ref(input_ids=token, cache=ref_cache, use_cache=True, **BOTH)
            ref_cache = _reference_cache(want)
            assert max_diff(got.logits, want.logits) <= LOGIT_TOL
            assert_decoder_outputs_match(got, want, n_layers)
            heads = ours.config.text_config.num_attention_heads
            assert got.attentions[0].shape == (2, heads, 1, prompt_len + step + 1)  # every cached key


def test_cached_decode_default_path_unchanged_by_requesting_outputs(tiny_pair):
    """A decode step with output_attentions (explicit softmax over the used slots) gives the same logits as
    the plain step (SDPA over the whole cache with a length mask)."""
    _, ours, _ = tiny_pair
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    caches = [KVCache.for_model(ours.config.text_config, batch_size=2, capacity=16) for _ in range(2)]
    with torch.no_grad():
        for kv in caches:
            ours(ids, attention_mask=mask, kv_cache=kv)
        token = torch.tensor([[5], [7]])
        plain = ours(token, kv_cache=caches[0])
        explicit = ours(token, kv_cache=caches[1], **BOTH)
    assert max_diff(plain.logits, explicit.logits) <= LOGIT_TOL
    probs = explicit.attentions[0]  # [B, H, 1, max(seq_lens)]; the padded row's unused slot gets 0
    assert probs.shape[-1] == 10 and torch.all(probs[1, :, :, 7:] == 0)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)


def test_qwen3_causal_lm_matches_transformers(hf_qwen3_dir):
    directory, theirs = hf_qwen3_dir
    theirs.set_attn_implementation("eager")
    ours = Qwen3ForCausalLM.from_pretrained(directory)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask, **BOTH), theirs(input_ids=ids, attention_mask=mask, **BOTH)
        got_base, want_base = ours.model(ids, output_hidden_states=True), theirs.model(ids, output_hidden_states=True)
    real = mask.bool()
    assert_decoder_outputs_match(got, want, ours.config.num_hidden_layers, real=real)
    assert max_diff(got_base.last_hidden_state, want_base.last_hidden_state) <= TOL
    for a, b in zip(got_base.hidden_states, want_base.hidden_states):
        assert max_diff(a, b) <= TOL
    assert torch.equal(got_base.hidden_states[-1], got_base.last_hidden_state)  # the final norm's output


def test_siglip_tower_matches_siglip_vision_model(tiny_pair):
    directory, ours, ref = tiny_pair
    tower = transformers.SiglipVisionModel(reference_config(ours.config).vision_config)
    tower.load_state_dict(ref.model.vision_tower.state_dict())
    tower.set_attn_implementation("eager")
    tower.eval()
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = ours.vision_tower(pixels, **BOTH), tower(pixels, **BOTH)
    n_layers = ours.config.vision_config.num_hidden_layers
    assert len(got.hidden_states) == len(want.hidden_states) == n_layers + 1
    assert len(got.attentions) == len(want.attentions) == n_layers
    for a, b in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions):
        assert max_diff(a, b) <= TOL
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
    # SigLIP's hidden_states are not post-normed (tie_last_hidden_states=False in transformers 5)
    assert max_diff(got.hidden_states[-1], got.last_hidden_state) > 1e-3
