"""The full R-4B model vs transformers' LLaVA-OneVision with R-4B's projector grafted on, both loaded
from the same synthetic checkpoint and computed in the same test (fp32, CPU).

Pixel values come from r4b's image processor (itself bit-identical to transformers', see
test_image_processing.py), so both models see identical inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import picture

from r4b_core.models.anyres import num_image_tokens
from r4b_core.config import preset
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.models.r4b import ImageTokenMismatchError, R4BForConditionalGeneration
from r4b_core.reference.parity import build_reference_model, reference_config
from r4b_core.reference.synthetic import make_synthetic_checkpoint

TOL = 1e-4
TILE = 56  # the tiny preset's tile (vision image_size)
OV_PINPOINTS = [[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)]  # LLaVA-OneVision's 6x6 grid


def write_checkpoint(directory, pinpoints=None, aspect_ratio=None, tie=False, seed=0):
    cfg = preset("tiny")
    if pinpoints is not None:
        cfg.image_grid_pinpoints = copy.deepcopy(pinpoints)
    if aspect_ratio is not None:
        cfg.vision_aspect_ratio = aspect_ratio
    cfg.text_config.tie_word_embeddings = tie
    make_synthetic_checkpoint(directory, config=cfg, seed=seed)
    return directory


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint, tiny_model, tiny_reference):
    """(checkpoint dir, ours, transformers reference) for the tiny preset (R-4B's 5 pinpoints): the session's
    shared ones (conftest.py), read-only; write_checkpoint() with no arguments writes the same checkpoint."""
    return tiny_checkpoint, tiny_model, tiny_reference


def image_prompt(config, sizes_per_sample, seed=0, text_before=5, text_after=7):
    """input_ids (left-padded) + attention_mask for samples whose images have the given (w, h) sizes."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sizes in sizes_per_sample:
        multi = len(sizes) > 1
        parts = [torch.randint(0, 1000, (text_before,), generator=gen)]
        for w, h in sizes:
            parts.append(torch.full((num_image_tokens((h, w), config, multi_image=multi),), config.image_token_index))
            parts.append(torch.randint(0, 1000, (2,), generator=gen))
        parts.append(torch.randint(0, 1000, (text_after,), generator=gen))
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def compare(directory, ours, ref, sizes_per_sample, seed=0):
    """Max abs logit diff over real tokens, and the number of image features used."""
    config = ours.config
    images = [[picture(w, h, seed + 10 * i + j) for j, (w, h) in enumerate(s)] for i, s in enumerate(sizes_per_sample)]
    inputs = preprocess_images(images, ImageProcessorConfig.from_pretrained(directory))
    ids, mask = image_prompt(config, sizes_per_sample, seed)
    kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                  batch_num_images=inputs["batch_num_images"], attention_mask=mask)
    with torch.no_grad():
        got = ours(ids, **kwargs).logits
        want = ref(input_ids=ids, **kwargs).logits
    real = mask.bool()
    assert want[real].abs().max() > 1.0  # logits that carry information
    return (got[real] - want[real]).abs().max().item(), int((ids == config.image_token_index).sum())


def test_text_only_prompt(tiny_pair):
    _, ours, ref = tiny_pair
    ids = torch.randint(0, 151936, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("size", [(150, 90), (90, 150), (56, 56), (1, 1), (400, 30), (30, 400), (200, 170)])
def test_single_image_r4b_pinpoints(tiny_pair, size):
    directory, ours, ref = tiny_pair
    diff, n_tokens = compare(directory, ours, ref, [[size]])
    assert n_tokens >= 16 and diff <= TOL  # a very wide image can unpad to zero rows: base view only


def test_multi_image_prompt(tiny_pair):
    directory, ours, ref = tiny_pair
    diff, n_tokens = compare(directory, ours, ref, [[(150, 90), (40, 70), (64, 64)]])
    assert n_tokens == 3 * (16 + 1) and diff <= TOL  # each image: base view + one newline


def test_batch_of_two_prompts_with_different_image_sizes(tiny_pair):
    directory, ours, ref = tiny_pair
    diff, _ = compare(directory, ours, ref, [[(150, 90)], [(60, 200)]])
    assert diff <= TOL


def test_loss_matches_reference(tiny_pair):
    directory, ours, ref = tiny_pair
    inputs = preprocess_images([picture(120, 80, 1)], ImageProcessorConfig.from_pretrained(directory))
    ids, _ = image_prompt(ours.config, [[(120, 80)]])
    labels = ids.masked_fill(ids == ours.config.image_token_index, -100)
    kwargs = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], labels=labels)
    with torch.no_grad():
        got, want = ours(ids, **kwargs).loss, ref(input_ids=ids, **kwargs).loss
    assert abs(got.item() - want.item()) <= 1e-5


@pytest.mark.parametrize("pinpoints", ["r4b", "onevision"])
@pytest.mark.parametrize("aspect_ratio", ["anyres", "anyres_max_9"])
def test_pinpoint_lists_and_aspect_ratios(tmp_path, pinpoints, aspect_ratio):
    pins = OV_PINPOINTS if pinpoints == "onevision" else None
    directory = write_checkpoint(tmp_path, pinpoints=pins, aspect_ratio=aspect_ratio)
    ours, ref = R4BForConditionalGeneration.from_pretrained(directory), build_reference_model(directory)
    # 224 x 224 with the 6x6 list: a 4x4 grid, a 16x16 map, ratio sqrt(256 / (9 * 16)) = 1.33 > 1.1 (the
    # smallest grid past anyres_max_9's threshold: 17 tiles, where 300 x 300's 6x6 grid had 37)
    diff, n_tokens = compare(directory, ours, ref, [[(224, 224)], [(120, 50)]])
    assert diff <= TOL
    first_image = num_image_tokens((224, 224), ours.config)
    if pinpoints == "r4b":  # 2x2 grid, an 8x8 map: small enough that no downscale ever fires
        assert first_image == 16 + 8 * 8 + 8
    elif aspect_ratio == "anyres":  # 4x4 grid, a 16x16 map kept whole
        assert first_image == 16 + 16 * 16 + 16
    else:  # the anyres_max_9 downscale fired: 16x16 -> int(16 / 1.33) = 12x12
        assert first_image == 16 + 12 * 12 + 12


def test_tied_lm_head_checkpoint(tmp_path):
    directory = write_checkpoint(tmp_path, tie=True)
    ours, ref = R4BForConditionalGeneration.from_pretrained(directory), build_reference_model(directory)
    assert ours.language_model.lm_head.weight is ours.language_model.model.embed_tokens.weight
    diff, _ = compare(directory, ours, ref, [[(100, 60)]])
    assert diff <= TOL


def _reference_vision_tower(ours, ref):
    """transformers' SiglipVisionModel holding a copy of the reference model's vision tower weights."""
    ref_cfg = reference_config(ours.config)
    tower = transformers.SiglipVisionModel(ref_cfg.vision_config)
    tower.load_state_dict(ref.model.vision_tower.state_dict())
    return tower.eval()


@pytest.mark.parametrize("layer", [-1, -2, 0, 1, [-2, -1]])
def test_vision_features_match_siglip_hidden_states(tiny_pair, layer):
    _, ours, ref = tiny_pair
    tower = _reference_vision_tower(ours, ref)
    pixels = torch.randn(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True)
        layers = layer if isinstance(layer, list) else [layer]
        want = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        got = ours.vision_tower(pixels, layer).features
        assert (got - want).abs().max() <= 1e-5
        assert (ours.vision_tower.last_hidden_state(pixels) - out.last_hidden_state).abs().max() <= 1e-5
    assert len(out.hidden_states) == ours.config.vision_config.num_hidden_layers + 1


def test_projected_features_match_reference(tiny_pair):
    directory, ours, ref = tiny_pair
    inputs = preprocess_images([picture(130, 70, 2)], ImageProcessorConfig.from_pretrained(directory))
    with torch.no_grad():
        got = ours.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        want = ref.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert len(got) == len(want) == 1
    assert got[0].shape == want[0].shape and (got[0] - want[0]).abs().max() <= 1e-5


def test_image_token_count_mismatch_is_an_error(tiny_pair):
    directory, ours, _ = tiny_pair
    inputs = preprocess_images([picture(100, 60, 3)], ImageProcessorConfig.from_pretrained(directory))
    ids, _ = image_prompt(ours.config, [[(100, 60)]])
    ids = ids[:, 1:]  # fine
    short = torch.cat([ids[:, :6], ids[:, 7:]], dim=1)  # drops one image token
    with pytest.raises(ImageTokenMismatchError, match="image tokens"):
        ours(short, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="image_sizes"):
        ours(ids, pixel_values=inputs["pixel_values"])
