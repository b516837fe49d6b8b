"""anyres tiling math against transformers' own functions, called in the same test.

References: ``select_best_resolution`` / ``get_patch_output_size`` (image_processing_utils),
``LlavaOnevisionImageProcessorPil._get_padding_size``, ``get_anyres_image_grid_shape``,
``image_size_to_num_patches``, ``unpad_image`` and ``LlavaOnevisionModel.pack_image_features``
(modeling_llava_onevision), ``LlavaOnevisionProcessor._get_number_of_features`` / ``replace_image_token``.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution as hf_select
from transformers.image_utils import ChannelDimension
from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from r4b_core.models import anyres
from r4b_core.config import R4BConfig, preset

R4B_PINS = preset("r4b").image_grid_pinpoints
OV_PINS = transformers.LlavaOnevisionConfig().image_grid_pinpoints  # the 36-entry 6x6 list
TINY_PINS = preset("tiny").image_grid_pinpoints
SIZES = [(1, 1), (1, 500), (500, 1), (3, 17), (17, 3), (300, 4000), (4000, 300), (384, 384), (383, 385),
         (385, 383), (768, 768), (1000, 1000), (480, 640), (1080, 1920), (780, 2040), (49, 49), (5000, 5000),
         (2, 3), (1, 5000), (5000, 1)]


def test_ov_default_pinpoints_are_the_6x6_list():
    assert OV_PINS == [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    assert LlavaOnevisionImageProcessorPil.image_grid_pinpoints == OV_PINS


def _config(tile: int = 384, patch: int = 14, pins=None, ratio: str = "anyres_max_9",
            strategy: str = "full") -> R4BConfig:
    base = preset("tiny")
    vision = dataclasses.replace(base.vision_config, image_size=tile, patch_size=patch)
    return R4BConfig(text_config=base.text_config, vision_config=vision, image_token_index=base.image_token_index,
                     image_grid_pinpoints=pins if pins is not None else R4B_PINS, vision_aspect_ratio=ratio,
                     vision_feature_select_strategy=strategy)


def _hf_self(tile: int, patch: int, pins):
    """A stand-in ``self`` for LlavaOnevisionModel.pack_image_features (it only reads self.config)."""
    vision = types.SimpleNamespace(image_size=tile, patch_size=patch)
    return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision, image_grid_pinpoints=pins))


def _hf_pack(view_features, size, newline, pins, tile, patch, ratio):
    packed, lens = hf_ov.LlavaOnevisionModel.pack_image_features(
        _hf_self(tile, patch, pins), [view_features], torch.tensor([size]), newline, ratio)
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0]


# ---------------------------------------------------------------------------------------------
# image side


@pytest.mark.parametrize("pins", [R4B_PINS, OV_PINS, TINY_PINS, [[768, 384], [384, 768], [768, 384]]],
                         ids=["r4b", "ov36", "tiny", "ties"])
def test_select_best_resolution_matches_transformers(pins):
    for size in SIZES:
        assert anyres.select_best_resolution(size, pins) == tuple(hf_select(size, pins))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000),
       pins=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=12))
def test_select_best_resolution_property(h, w, pins):
    pins = [[384 * a, 384 * b] for a, b in pins]
    assert anyres.select_best_resolution((h, w), pins) == tuple(hf_select((h, w), pins))


def test_select_best_resolution_tie_breaks():
    # every pinpoint holds a 10x10 image whole: the least waste wins, then the first in list order
    assert anyres.select_best_resolution((10, 10), [[768, 768], [384, 768], [768, 384]]) == (384, 768)
    assert anyres.select_best_resolution((10, 10), [[768, 384], [384, 768]]) == (768, 384)
    # a 1x5000 strip has effective 0 everywhere (int(1 * scale) == 0): the smallest canvas is taken
    assert anyres.select_best_resolution((1, 5000), [[768, 1152], [384, 1152]]) == (384, 1152)


def test_resize_and_padding_match_transformers():
    hf = LlavaOnevisionImageProcessorPil()
    for pins in (R4B_PINS, OV_PINS, TINY_PINS):
        for size in SIZES:
            target = anyres.select_best_resolution(size, pins)
            fake = np.broadcast_to(np.zeros((), np.uint8), (3, *size))  # only its shape is read
            theirs = get_patch_output_size(fake, target, input_data_format=ChannelDimension.FIRST)
            ours = anyres.resize_for_patching_size(size, target)
            assert ours == tuple(theirs)
            (top, bottom), (left, right) = hf._get_padding_size(ours, target)
            assert anyres.padding_for_patching(ours, target) == (top, bottom, left, right)
            assert ours[0] + top + bottom == target[0] and ours[1] + left + right == target[1]


def test_padding_puts_the_odd_pixel_last():
    assert anyres.padding_for_patching((381, 768), (384, 768)) == (1, 2, 0, 0)
    assert anyres.padding_for_patching((384, 1), (384, 768)) == (0, 0, 383, 384)


@pytest.mark.parametrize("pins,tile", [(R4B_PINS, 384), (OV_PINS, 384), (TINY_PINS, 56)])
def test_grid_shape_and_num_views_match_transformers(pins, tile):
    for size in SIZES:
        assert anyres.grid_shape(size, pins, tile) == tuple(hf_ov.get_anyres_image_grid_shape(size, pins, tile))
        assert anyres.num_views(size, pins, tile) == hf_ov.image_size_to_num_patches(size, pins, tile)


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="empty"):
        anyres.select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="positive"):
        anyres.select_best_resolution((0, 10), R4B_PINS)
    with pytest.raises(ValueError, match="multiple of the tile size"):
        anyres.grid_shape((10, 10), [[400, 400]], 384)
    with pytest.raises(ValueError, match="anyres_max_N"):
        anyres.max_tiles("anyres_max_")


# ---------------------------------------------------------------------------------------------
# feature side


@pytest.mark.parametrize("fh,fw", [(27, 54), (54, 27), (54, 54), (27, 81), (81, 27), (27, 27), (162, 162), (8, 4)])
def test_unpad_matches_transformers(fh, fw):
    feats = torch.randn(3, fh, fw)
    for size in SIZES:
        theirs = hf_ov.unpad_image(feats, torch.tensor(size))
        ours = anyres.unpad_feature_map(feats, size)
        assert torch.equal(ours, theirs)
        assert anyres.unpadded_feature_size(size, fh, fw) == tuple(theirs.shape[1:])


def test_unpad_round_7_detail():
    # 49x49 on a 27x54 map: 49 * (27 / 49) = 26.999999999999996; round(., 7) makes it 27, so one
    # padding column is dropped at each end less than int() alone would drop (28 columns, not 26)
    assert 49 * (27 / 49) != 27 and int(49 * (27 / 49)) == 26
    assert anyres.unpadded_feature_size((49, 49), 27, 54) == (27, 28)
    assert hf_ov.unpad_image(torch.zeros(1, 27, 54), (49, 49)).shape[1:] == (27, 28)
    assert anyres.grid_shape((49, 49), R4B_PINS, 384) == (1, 2)  # this map is what R-4B gives a 49x49 image


def test_downscale_matches_interpolate_rule():
    feats = torch.randn(4, 162, 162)
    out = anyres.anyres_max_downscale(feats, 9, 27)  # ratio = sqrt(162^2 / (9 * 27^2)) = 2 -> 81x81
    ref = torch.nn.functional.interpolate(feats[None], [81, 81], mode="bilinear", align_corners=False)[0]
    assert out.shape == (4, 81, 81) and torch.equal(out, ref)
    small = torch.randn(4, 54, 81)  # ratio = sqrt(54*81 / 6561) < 1.1: untouched
    assert anyres.anyres_max_downscale(small, 9, 27) is small
    assert anyres.anyres_max_downscale(feats, None, 27) is feats  # plain "anyres"
    assert anyres.downscaled_size(89, 89, 9, 27) == (89, 89)  # ratio 1.0988 <= 1.1
    # ratio = sqrt(8100 / 6561) = 1.1111111111111112 (rounded up), so 90 // ratio floors to 80, not 81
    assert anyres.downscaled_size(90, 90, 9, 27) == (80, 80)


def _views(size, pins, tile, patch, dim, gen):
    side = tile // patch
    return torch.randn(anyres.num_views(size, pins, tile), side * side, dim, generator=gen)


@pytest.mark.parametrize("ratio", ["anyres_max_9", "anyres_max_1", "anyres_max_4"])
@pytest.mark.parametrize("pins,tile,patch", [(R4B_PINS, 384, 14), (OV_PINS, 384, 14), (TINY_PINS, 56, 14)],
                         ids=["r4b", "ov36", "tiny"])
def test_pack_matches_transformers(pins, tile, patch, ratio):
    gen = torch.Generator().manual_seed(0)
    dim, fired = 4, 0
    newline = torch.randn(dim, generator=gen)
    sizes = [(1, 1), (17, 3), (300, 4000), (4000, 300), (385, 383), (1000, 1000), (480, 640), (49, 49),
             (2304, 2304), (1600, 2300)]
    for size in sizes:
        views = _views(size, pins, tile, patch, dim, gen)
        ours = anyres.pack_image_features(views, size, newline, pins, tile, tile // patch, ratio)
        theirs = _hf_pack(views, size, newline, pins, tile, patch, ratio)
        assert torch.equal(ours, theirs), size
        assert ours.shape[0] == anyres.num_image_tokens(size, _config(tile, patch, pins, ratio))
        side = tile // patch
        rows, cols = anyres.grid_shape(size, pins, tile)
        h, w = anyres.unpadded_feature_size(size, side * rows, side * cols)
        fired += ours.shape[0] < side * side + h * w + h
    if pins is OV_PINS and ratio == "anyres_max_9":
        assert fired >= 2  # the 36-entry list with big images really exercises the bilinear downscale


def test_plain_anyres_never_downscales():
    gen = torch.Generator().manual_seed(1)
    newline = torch.randn(4, generator=gen)
    size = (2304, 2304)  # 6x6 tiles on OV's list: 162x162 map, which anyres_max_9 would halve
    views = _views(size, OV_PINS, 384, 14, 4, gen)
    ours = anyres.pack_image_features(views, size, newline, OV_PINS, 384, 27, "anyres")
    # stock transformers crashes on "anyres" (int("") after strip); a huge N never fires, same meaning
    theirs = _hf_pack(views, size, newline, OV_PINS, 384, 14, "anyres_max_100000")
    assert torch.equal(ours, theirs) and ours.shape[0] == 729 + 162 * 163
    assert anyres.num_image_tokens(size, _config(pins=OV_PINS, ratio="anyres")) == 729 + 162 * 163


def test_single_view_is_base_plus_one_newline():
    views, newline = torch.randn(1, 729, 8), torch.randn(8)
    out = anyres.pack_image_features(views, (300, 4000), newline, R4B_PINS, 384, 27, "anyres_max_9")
    assert out.shape == (730, 8) and torch.equal(out[:729], views[0]) and torch.equal(out[729], newline)
    assert torch.equal(out, _hf_pack(views, (300, 4000), newline, R4B_PINS, 384, 14, "anyres_max_9"))
    assert anyres.num_image_tokens((300, 4000), preset("r4b"), multi_image=True) == 730


def test_pack_layout_row_major_with_newlines():
    # tiny hand-made case: 2 tiles side by side (1x2 grid), 2x2 patches per tile, D = 1
    base = torch.full((4, 1), -1.0)
    tiles = torch.arange(8.0).view(2, 4, 1)  # tile 0 = [[0, 1], [2, 3]], tile 1 = [[4, 5], [6, 7]]
    out = anyres.pack_image_features(torch.cat([base[None], tiles]), (4, 8), torch.tensor([9.0]),
                                     [[4, 8]], 4, 2, "anyres")
    expected = [-1, -1, -1, -1, 0, 1, 4, 5, 9, 2, 3, 6, 7, 9]
    assert out.flatten().tolist() == expected


def test_default_strategy_like_transformers():
    # multi-image: each view loses its first patch, count = 729 (transformers: num_image_tokens + 1 - 1)
    cfg = _config(strategy="default")
    hf_proc = types.SimpleNamespace(vision_feature_select_strategy="default", num_image_tokens=729, image_token="<i>")
    inputs = {"batch_num_images": [2], "image_sizes": [[30, 40], [50, 60]]}
    text = LlavaOnevisionProcessor.replace_image_token(hf_proc, inputs, 0)
    assert anyres.num_image_tokens((30, 40), cfg, multi_image=True) == text.count("<i>") == 729
    views, newline = torch.randn(1, 728, 4), torch.randn(4)
    assert anyres.pack_image_features(views, (30, 40), newline, R4B_PINS, 384, 27, "anyres_max_9").shape[0] == 729
    # a tiled image cannot be packed by transformers' model with a 728-patch base view: both refuse
    size = (480, 640)
    views = torch.randn(anyres.num_views(size, R4B_PINS, 384), 728, 4)
    with pytest.raises(ValueError, match="not consistent"):
        _hf_pack(views, size, newline, R4B_PINS, 384, 14, "anyres_max_9")
    with pytest.raises(ValueError, match="not consistent"):
        anyres.pack_image_features(views, size, newline, R4B_PINS, 384, 27, "anyres_max_9")
    with pytest.raises(ValueError, match="default"):
        anyres.num_image_tokens(size, cfg)


# ---------------------------------------------------------------------------------------------
# token counts


def _hf_count(size, pins, ratio, num_image_tokens=729, tile=384):
    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
                                 num_image_tokens=num_image_tokens, vision_aspect_ratio=ratio)
    proc._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, proc)
    return LlavaOnevisionProcessor._get_number_of_features(proc, size[0], size[1], tile, tile)


@pytest.mark.parametrize("pins", [R4B_PINS, OV_PINS], ids=["r4b", "ov36"])
def test_num_image_tokens_matches_transformers_processor(pins):
    cfg = _config(pins=pins)
    fired = 0
    for size in SIZES:
        ours = anyres.num_image_tokens(size, cfg)
        assert ours == _hf_count(size, pins, "anyres_max_9"), size
        fired += ours != _hf_count(size, pins, "anyres_max_100000")
    assert fired > 0 if pins is OV_PINS else fired == 0  # R-4B's 5 pinpoints never reach the downscale


def test_num_image_tokens_r4b_worked_examples():
    # r4b_spec.md §2.5: R-4B's own processor (no downscale in its count) on the 5 inferred pinpoints
    cfg = preset("r4b")
    examples = {(480, 640): 2929, (1000, 1000): 3699, (1080, 1920): 2379, (780, 2040): 2673, (384, 384): 1512}
    for size, n in examples.items():
        assert anyres.num_image_tokens(size, cfg) == n
        assert anyres.num_image_tokens(size, dataclasses.replace(cfg, vision_aspect_ratio="anyres")) == n


def test_tiny_hf_model_packs_what_we_count():
    """A real tiny LlavaOnevisionModel: its packed feature lengths equal num_image_tokens."""
    from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
    from PIL import Image

    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=56, patch_size=14)
    text = transformers.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    hf_cfg = transformers.LlavaOnevisionConfig(text_config=text, vision_config=vision, image_grid_pinpoints=TINY_PINS,
                                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    model = hf_ov.LlavaOnevisionModel(hf_cfg).eval()
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    shapes = [(30, 200), (90, 90), (7, 3)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    batch = preprocess_images([[images[0]], [images[1], images[2]]], ImageProcessorConfig.for_model(cfg))
    with torch.no_grad():
        out = model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                       batch_num_images=batch["batch_num_images"], vision_feature_layer=-1,
                                       vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    lens = [f.shape[0] for f in out.pooler_output]
    sizes = [tuple(s) for s in batch["image_sizes"].tolist()]
    assert lens == [anyres.num_image_tokens(sizes[0], cfg)] + [anyres.num_image_tokens(s, cfg, True) for s in sizes[1:]]
    assert lens[0] > 17 and lens[1:] == [17, 17]


# ---------------------------------------------------------------------------------------------
# property: count == packed rows, for any size and any pinpoint list


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 5000), w=st.integers(1, 5000),
    geometry=st.sampled_from([(4, 2), (6, 2), (6, 3), (8, 4)]),
    grid=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=8),
    ratio=st.sampled_from(["anyres", "anyres_max_1", "anyres_max_2", "anyres_max_4", "anyres_max_9"]),
)
def test_count_equals_packed_rows(h, w, geometry, grid, ratio):
    tile, patch = geometry
    pins = [[tile * a, tile * b] for a, b in grid]
    cfg = _config(tile, patch, pins, ratio)
    side = tile // patch
    views = torch.randn(anyres.num_views((h, w), pins, tile), side * side, 4)
    packed = anyres.pack_image_features(views, (h, w), torch.randn(4), pins, tile, side, ratio)
    assert anyres.num_image_tokens((h, w), cfg) == packed.shape[0]


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000),
       grid=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=8),
       n=st.sampled_from([1, 2, 4, 9]))
def test_pack_equals_transformers_property(h, w, grid, n):
    tile, patch = 6, 2
    pins = [[tile * a, tile * b] for a, b in grid]
    side = tile // patch
    rows, cols = anyres.grid_shape((h, w), pins, tile)
    uh, uw = anyres.unpadded_feature_size((h, w), side * rows, side * cols)
    dh, dw = anyres.downscaled_size(uh, uw, n, side)
    assume((dh, dw) == (uh, uw) or (dh > 0 and dw > 0))  # transformers' interpolate raises on a zero side
    views = torch.randn(1 + rows * cols, side * side, 4)
    newline = torch.randn(4)
    ours = anyres.pack_image_features(views, (h, w), newline, pins, tile, side, f"anyres_max_{n}")
    theirs = _hf_pack(views, (h, w), newline, pins, tile, patch, f"anyres_max_{n}")
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0) and ours.shape == theirs.shape
    assert ours.shape[0] == _hf_count((h, w), pins, f"anyres_max_{n}", side * side, tile)


def test_zero_sided_downscale_gives_an_empty_map():
    # 1 x 5000 on a 1x40-tile canvas with 3x3 patches: the unpadded map is 1 x 120, ratio 1.217 gives
    # (0, 98); transformers' interpolate raises there, its processor counts 0 rows; so do we
    pins, side = [[6, 240]], 3
    assert anyres.unpadded_feature_size((1, 5000), side, 40 * side) == (1, 120)
    assert anyres.downscaled_size(1, 120, 9, side) == (0, 98)
    views = torch.randn(41, 9, 3)
    out = anyres.pack_image_features(views, (1, 5000), torch.randn(3), pins, 6, side, "anyres_max_9")
    assert torch.equal(out, views[0])
    assert anyres.num_image_tokens((1, 5000), _config(6, 2, pins, "anyres_max_9")) == 9
    assert _hf_count((1, 5000), pins, "anyres_max_9", 9, 6) == 9
