"""image_regions: every image token to (image, view, row, col) and a box on the picture.

The map is checked against the packing the model really does: labelled features go through
``anyres.pack_image_features`` and through ``R4BForConditionalGeneration.embed`` (a stand-in vision tower
that writes each view's identity into its features), and the map must read the labels back. Boxes are
checked against the pixels the image processor puts into each patch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from r4b_core.models import anyres
from r4b_core.config import R4BConfig, preset
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.interp.image_regions import (
    NEWLINE_VIEW, heat_on_picture, image_layout, image_token_map, region_box, token_boxes,
)

R4B_PINS = preset("r4b").image_grid_pinpoints
TINY_PINS = preset("tiny").image_grid_pinpoints
OV_PINS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
IMG = preset("tiny").image_token_index


def _config(pins, tile: int, ratio: str, strategy: str = "full") -> R4BConfig:
    base = preset("tiny")
    vision = dataclasses.replace(base.vision_config, image_size=tile, patch_size=14)
    return R4BConfig(text_config=base.text_config, vision_config=vision, image_token_index=IMG,
                     image_grid_pinpoints=pins, vision_aspect_ratio=ratio, vision_feature_select_strategy=strategy)


CONFIGS = {
    "r4b-anyres": _config(R4B_PINS, 384, "anyres"),
    "r4b-max9": _config(R4B_PINS, 384, "anyres_max_9"),
    "r4b-max1": _config(R4B_PINS, 384, "anyres_max_1"),  # downscale fires for most sizes
    "tiny-anyres": _config(TINY_PINS, 56, "anyres"),
    "tiny-max2": _config(TINY_PINS, 56, "anyres_max_2"),
    "ov36-max9": _config(OV_PINS, 384, "anyres_max_9"),
}


def _prompt(n_tokens_per_sample: list[list[int]], gaps: list[int]) -> torch.Tensor:
    """[B, T] ids: text (id 7) around each image's run of image tokens, left padded with id 0."""
    rows, g = [], iter(gaps * 100)
    for counts in n_tokens_per_sample:
        row = [7] * next(g)
        for n in counts:
            row += [IMG] * n + [7] * next(g)
        rows.append(row)
    width = max(len(r) for r in rows)
    return torch.tensor([[0] * (width - len(r)) + r for r in rows])


# ---------------------------------------------------------------------------------------------
# property: the map covers every image token once and follows the packing


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)),
       sizes=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=3),
       multi_second=st.booleans(), gaps=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_map_covers_every_image_token_once(name, sizes, multi_second, gaps):
    config = CONFIGS[name]
    side = config.vision_config.image_size // 14
    # sample 0: the first image alone (tiled); sample 1: the rest (one view each when there are several)
    samples = [sizes[:1]] + ([sizes[1:]] if len(sizes) > 1 else [])
    if not multi_second and len(sizes) > 1:
        samples = [[s] for s in sizes]
    multi = [len(s) > 1 for s in samples for _ in s]
    counts = [[anyres.num_image_tokens(size, config, multi_image=len(s) > 1) for size in s] for s in samples]
    ids = _prompt(counts, gaps)
    m = image_token_map(config, [s for sample in samples for s in sample], ids,
                        batch_num_images=[len(s) for s in samples])

    where = torch.nonzero(ids == IMG)
    assert len(m) == len(where) == sum(map(sum, counts))
    assert torch.equal(m.batch, where[:, 0]) and torch.equal(m.position, where[:, 1])
    start = 0
    for i, (size, is_multi) in enumerate(zip([s for sample in samples for s in sample], multi)):
        n = anyres.num_image_tokens(size, config, multi_image=is_multi)
        sel = slice(start, start + n)
        start += n
        assert (m.image[sel] == i).all()
        view, row, col = m.view[sel], m.row[sel], m.col[sel]
        # base view: every patch of the side x side grid once, row-major
        assert torch.equal(view[:side * side], torch.zeros(side * side, dtype=torch.long))
        assert torch.equal(row[:side * side] * side + col[:side * side], torch.arange(side * side))
        if is_multi:
            assert n == side * side + 1 and view[-1] == NEWLINE_VIEW
            continue
        layout = m.layouts[i]
        h, w = layout.map_size
        rows_, cols_ = anyres.grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        tiles_view, tiles_row, tiles_col = view[side * side:], row[side * side:], col[side * side:]
        assert len(tiles_view) == h * (w + 1)
        newline = tiles_view == NEWLINE_VIEW
        assert int(newline.sum()) == h and (tiles_col[newline] == w).all()  # one newline per map row, at its end
        cells = ~newline
        assert ((tiles_view[cells] >= 1) & (tiles_view[cells] <= rows_ * cols_)).all()
        assert ((tiles_row >= 0) & (tiles_row < h)).all() and ((tiles_col[cells] >= 0) & (tiles_col[cells] < w)).all()
        assert torch.equal(tiles_row * (w + 1) + tiles_col, torch.arange(h * (w + 1)))  # row-major, each once


def test_default_strategy_single_views_drop_the_first_patch():
    config = _config(R4B_PINS, 384, "anyres_max_9", strategy="default")
    ids = _prompt([[anyres.num_image_tokens((50, 80), config, True)] * 2], [2])
    m = image_token_map(config, [(50, 80), (90, 20)], ids, batch_num_images=[2])
    assert len(m) == 2 * 729 and m.region(0) == (0, "base", 0, 1) and m.region(728) == (0, "newline", -1, -1)
    with pytest.raises(ValueError, match="default"):
        image_token_map(config, [(50, 80)], ids[:, :731])


def test_count_mismatch_and_bad_arguments_are_value_errors():
    config = CONFIGS["r4b-max9"]
    n = anyres.num_image_tokens((480, 640), config)
    ids = _prompt([[n - 1]], [3])
    with pytest.raises(ValueError, match=f"has {n - 1} image tokens .* pack into {n}"):
        image_token_map(config, [(480, 640)], ids)
    with pytest.raises(ValueError, match="exactly one of"):
        image_token_map(config, [(480, 640)])
    with pytest.raises(ValueError, match="sequence order"):
        image_token_map(config, [(480, 640)], positions=torch.arange(n).flip(0))
    with pytest.raises(ValueError, match="batch_num_images"):
        image_token_map(config, [(480, 640)], _prompt([[n]], [1]), batch_num_images=[2])
    m = image_token_map(config, [(480, 640)], positions=torch.arange(5, 5 + n))
    assert m.position[0] == 5 and m.region(len(m) - 1) == (0, "newline", 39, 54)


# ---------------------------------------------------------------------------------------------
# labelled features through the model's own packing


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_labelled_features_read_back_through_pack_image_features(name):
    config = CONFIGS[name]
    tile = config.vision_config.image_size
    side = tile // 14
    fired = 0
    for size in [(480, 640), (640, 480), (1, 1), (49, 49), (300, 4000), (4000, 300), (1000, 1000), (385, 383),
                 (2304, 2304), (90, 1700), (1600, 2300)]:
        rows, cols = anyres.grid_shape(size, config.image_grid_pinpoints, tile)
        # view v, patch (a, b): base -> (a, b, 0); tile (i, j) -> its row / column in the whole tile map, 1
        a = torch.arange(side, dtype=torch.float64)
        base = torch.stack([a[:, None].expand(side, side), a[None, :].expand(side, side), torch.zeros(side, side)], -1)
        tiles = [torch.stack([(i * side + a)[:, None].expand(side, side), (j * side + a)[None, :].expand(side, side),
                              torch.ones(side, side)], -1) for i in range(rows) for j in range(cols)]
        views = torch.stack([base, *tiles]).reshape(1 + rows * cols, side * side, 3)
        newline = torch.tensor([-7.0, -7.0, -7.0], dtype=torch.float64)
        packed = anyres.pack_image_features(views, size, newline, config.image_grid_pinpoints, tile, side,
                                            config.vision_aspect_ratio)
        m = image_token_map(config, [size], positions=torch.arange(packed.shape[0]))
        layout = m.layouts[0]
        assert len(m) == packed.shape[0] == layout.num_tokens
        nl = m.is_newline
        assert (packed[nl] == -7).all() and not (packed[~nl] == -7).any()
        b = m.is_base
        assert torch.equal(packed[b], torch.stack([m.row[b], m.col[b], torch.zeros_like(m.row[b])], -1).double())
        t = ~b & ~nl
        (uh, uw), (h, w), (r0, c0) = layout.unpadded, layout.map_size, layout.crop
        assert torch.allclose(packed[t, 2], torch.ones_like(packed[t, 2]), atol=1e-12)
        if (h, w) == (uh, uw):  # no downscale: exactly the padded-map cell the map names
            assert torch.equal(packed[t, 0], (m.row[t] + r0).double())
            assert torch.equal(packed[t, 1], (m.col[t] + c0).double())
        else:  # bilinear sampling of a linear ramp: the value at the cell's sample point
            fired += 1
            assert torch.allclose(packed[t, 0], r0 + (m.row[t].double() + 0.5) * uh / h - 0.5, atol=1e-9)
            assert torch.allclose(packed[t, 1], c0 + (m.col[t].double() + 0.5) * uw / w - 0.5, atol=1e-9)
        centre = packed[t, :2] + 0.5  # sample point in continuous map coordinates (cell k spans [k, k + 1))
        on_edge = ((centre / side - (centre / side).round()).abs() < 1e-9).any(-1)  # exactly between two tiles
        centre_tile = (centre / side).floor().long()
        centre_tile = centre_tile[:, 0].clamp(0, rows - 1) * cols + centre_tile[:, 1].clamp(0, cols - 1)
        assert torch.equal(m.view[t][~on_edge], 1 + centre_tile[~on_edge])
    if name in ("r4b-max1", "tiny-max2", "ov36-max9"):
        assert fired >= 2, "the downscale path was not exercised"


def test_labelled_views_read_back_through_the_model_splice():
    """The model's embed (a batch of two: one tiled image; two single-view images), with the projector's
    output replaced (hook) by features that say which view of which image they came from."""
    from r4b_core.models.hooks import hooks
    from r4b_core.models.r4b import R4BForConditionalGeneration

    config = preset("tiny")
    config.vision_aspect_ratio = "anyres_max_1"  # so the downscale fires for the tiled image
    torch.manual_seed(0)
    model = R4BForConditionalGeneration(config)
    with torch.no_grad():
        model.image_newline.fill_(-3.0)
    sizes = [(100, 300), (40, 50), (70, 20)]
    batch_num = [1, 2]
    n_views = [anyres.num_views(sizes[0], config.image_grid_pinpoints, 56), 1, 1]
    labels = torch.tensor([100 * i + v for i, n in enumerate(n_views) for v in range(n)], dtype=torch.float32)

    def label_views(features, name):  # [V, P, C] -> (100 * image + view, patch index, 0, ...)
        out = torch.zeros_like(features)
        out[..., 0] = labels[:, None]
        out[..., 1] = torch.arange(features.shape[1], dtype=out.dtype)
        return out

    counts = [[anyres.num_image_tokens(sizes[0], config)],
              [anyres.num_image_tokens(s, config, multi_image=True) for s in sizes[1:]]]
    ids = _prompt(counts, [3, 1, 2])
    with torch.no_grad(), hooks(model, [("multi_modal_projector.hook_out", label_views)]):
        embeds = model.embed(ids, torch.zeros(3, max(n_views), 3, 56, 56), torch.tensor(sizes), torch.tensor(batch_num))
    m = image_token_map(config, sizes, ids, batch_num_images=batch_num)
    got = embeds[m.batch, m.position]  # [N, C]
    nl = m.is_newline
    assert (got[nl] == -3).all() and not (got[~nl] == -3).all(-1).any()
    base = m.is_base
    assert torch.equal(got[base, 0], (100 * m.image[base]).float())
    assert torch.equal(got[base, 1], (m.row[base] * 4 + m.col[base]).float())
    tiles = ~base & ~nl
    assert tiles.sum() > 0 and (m.image[tiles] == 0).all()
    layout = m.layouts[0]
    assert layout.map_size != layout.unpadded  # downscaled: labels are blends of neighbouring tiles
    assert ((got[tiles, 0] >= 1) & (got[tiles, 0] <= n_views[0] - 1)).all()
    # with no downscale every cell carries exactly its own tile's label and patch
    config.vision_aspect_ratio = "anyres"
    counts[0] = [anyres.num_image_tokens(sizes[0], config)]
    ids = _prompt(counts, [3, 1, 2])
    with torch.no_grad(), hooks(model, [("multi_modal_projector.hook_out", label_views)]):
        embeds = model.embed(ids, torch.zeros(3, max(n_views), 3, 56, 56), torch.tensor(sizes), torch.tensor(batch_num))
    m = image_token_map(config, sizes, ids, batch_num_images=batch_num)
    got = embeds[m.batch, m.position]
    tiles = ~m.is_base & ~m.is_newline
    layout = m.layouts[0]
    assert torch.equal(got[tiles, 0], m.view[tiles].float())
    in_tile = (m.row[tiles] + layout.crop[0]) % 4 * 4 + (m.col[tiles] + layout.crop[1]) % 4
    assert torch.equal(got[tiles, 1], in_tile.float())


# ---------------------------------------------------------------------------------------------
# boxes


def _ramp(width: int, height: int) -> Image.Image:
    """R encodes x, G encodes y (the centre of each pixel, 0..255 across the picture)."""
    x = (np.arange(width) + 0.5) / width * 255
    y = (np.arange(height) + 0.5) / height * 255
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[..., 0] = np.round(x)[None, :]
    a[..., 1] = np.round(y)[:, None]
    return Image.fromarray(a)


@pytest.mark.parametrize("name,size", [("r4b-anyres", (480, 640)), ("r4b-anyres", (300, 1000)),
                                       ("r4b-anyres", (900, 500)), ("tiny-anyres", (480, 640)),
                                       ("tiny-anyres", (200, 90))])
def test_boxes_hold_the_pixels_each_patch_saw(name, size):
    """The mean colour of a patch in pixel_values equals the ramp's mean over the token's box."""
    config = CONFIGS[name]
    tile, p = config.vision_config.image_size, 14
    side = tile // p
    H, W = size
    pre = preprocess_images([_ramp(W, H)], ImageProcessorConfig.for_model(config))
    pixels = pre["pixel_values"][0] * 0.5 + 0.5  # undo mean = std = 0.5 -> [views, 3, S, S] in 0..1
    m = image_token_map(config, [size], positions=torch.arange(anyres.num_image_tokens(size, config)))
    layout = m.layouts[0]
    boxes = token_boxes(m)
    checked = [0, 0]  # base patches, tile cells
    for i in range(len(m)):
        if m.is_newline[i]:
            continue
        view, row, col = int(m.view[i]), int(m.row[i]), int(m.col[i])
        x0, y0, x1, y1 = boxes[i].tolist()
        if view == 0:
            a, b = row, col
        else:
            gr, gc = row + layout.crop[0], col + layout.crop[1]
            a, b = gr % side, gc % side
        patch = pixels[view, :, a * p:(a + 1) * p, b * p:(b + 1) * p]
        # bicubic resampling of a ramp is exact except within ~2 view pixels of the picture's edges (this also
        # skips patches that saw some of the zero padding: their boxes are clipped at the edge)
        mx, my = (3 * W / tile, 3 * H / tile) if view == 0 else (3 * W / layout.resized[1], 3 * H / layout.resized[0])
        if x0 < mx or y0 < my or x1 > W - mx or y1 > H - my:
            continue
        # measured: within 0.3 levels; a box off by the 6 unseen pixels of a 384-px tile is off by > 1
        assert abs(float(patch[0].mean()) * 255 - (x0 + x1) / 2 / W * 255) < 0.6, (i, m.region(i))
        assert abs(float(patch[1].mean()) * 255 - (y0 + y1) / 2 / H * 255) < 0.6, (i, m.region(i))
        checked[min(view, 1)] += 1
    assert checked[0] >= 4 and checked[1] >= 12, checked


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 700), w=st.integers(1, 700), name=st.sampled_from(["tiny-anyres", "tiny-max2"]))
def test_boxes_tile_the_picture(h, w, name):
    """56-px tiles of 4x4 patches (no unseen edge): base boxes cover every pixel exactly once; tile-map boxes
    never overlap and cover the picture but for slivers at its edges that unpadding cut; the heat map keeps
    the total mass."""
    config = CONFIGS[name]
    m = image_token_map(config, [(h, w)], positions=torch.arange(anyres.num_image_tokens((h, w), config)))
    layout = m.layouts[0]
    boxes = token_boxes(m).nan_to_num(0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # value = area: each pixel gets the fraction of it that the chosen boxes cover, summed over boxes
    base_cover = heat_on_picture(m, torch.where(m.is_base, areas, 0.0))
    assert torch.allclose(base_cover, torch.ones(h, w, dtype=torch.float64), atol=1e-9)
    cells = ~m.is_base & ~m.is_newline
    cell_cover = heat_on_picture(m, torch.where(cells, areas, 0.0))
    assert float(cell_cover.max()) <= 1 + 1e-9
    cell_h, cell_w = 14 * h / layout.resized[0], 14 * w / layout.resized[1]  # picture pixels per tile-map cell
    inner = cell_cover[int(cell_h) + 1:h - int(cell_h) - 1, int(cell_w) + 1:w - int(cell_w) - 1]
    if min(layout.map_size) > 0:  # (an empty map: the picture was under one cell wide and unpadding cut it all)
        assert inner.numel() == 0 or torch.allclose(inner, torch.ones_like(inner), atol=1e-9)
    values = torch.rand(len(m), generator=torch.Generator().manual_seed(h * 1000 + w), dtype=torch.float64)
    heat = heat_on_picture(m, values)
    assert float(heat.sum()) == pytest.approx(float(values[areas > 0].sum()), rel=1e-9)
    # every box lies inside the picture
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_region_box_examples_and_errors():
    config = CONFIGS["r4b-max9"]
    layout = image_layout((480, 640), config)  # canvas 768x768, resized 576x768, 96 px pad above and below
    assert layout.crop == (7, 0) and layout.map_size == (40, 54)
    assert region_box(layout, "base", 0, 0) == pytest.approx((0.0, 0.0, 14 * 640 / 384, 14 * 480 / 384))
    # the last base patch ends 6 tile pixels before the edge: 378 / 384 of the picture
    assert region_box(layout, 0, 26, 26)[2:] == pytest.approx((378 * 640 / 384, 378 * 480 / 384))
    # map row 0 = padded row 7 = canvas rows 98..112 -> picture rows (98 - 96) * 480 / 576 ...
    x0, y0, x1, y1 = region_box(layout, 1, 0, 0)
    assert (x0, y0, x1, y1) == pytest.approx((0, 2 * 480 / 576, 14 * 640 / 768, 16 * 480 / 576))
    # column 27 is the first patch of the second tile: canvas x 384
    assert region_box(layout, 2, 0, 27)[0] == pytest.approx(384 * 640 / 768)
    with pytest.raises(ValueError, match="newline"):
        region_box(layout, NEWLINE_VIEW, 0, 54)
    with pytest.raises(ValueError, match="outside the 40 x 54 map"):
        region_box(layout, 1, 40, 0)
    single = image_layout((480, 640), config, multi_image=True)
    with pytest.raises(ValueError, match="single view"):
        region_box(single, 1, 0, 0)
    # a multi-image view is padded to a 640x640 square first: 80 px above the picture
    assert region_box(single, 0, 0, 0) == pytest.approx((0.0, 0.0, 14 * 640 / 384, 0.0))
    assert region_box(single, 0, 5, 0)[1] == pytest.approx(5 * 14 * 640 / 384 - 80)
