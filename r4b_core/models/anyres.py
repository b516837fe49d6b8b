"""LLaVA-OneVision "anyres" tiling math as pure functions.

Mirrors transformers' ``select_best_resolution`` / ``get_patch_output_size`` (image_processing_utils),
``LlavaOnevisionImageProcessorPil`` (resize + pad + tiles), ``get_anyres_image_grid_shape``,
``unpad_image`` and ``LlavaOnevisionModel.pack_image_features`` (modeling_llava_onevision) and
``LlavaOnevisionProcessor._get_number_of_features`` (processing_llava_onevision), read in 4.55 and 5.24.
Image sizes are always ``(height, width)``.

How one image becomes features (R-4B: tile 384, 27x27 patches per view)::

    image (H, W) --select_best_resolution--> canvas (bh, bw), a pinpoint
      view 0   : the whole image squeezed to one tile            -> base   [P, D], P = 27*27
      views 1..: image resized to fit the canvas (aspect kept), zero padded, cut into rows x cols
                 tiles, row-major                                 -> tiles  [rows*cols, P, D]

    tiles -> one map [D, 27*rows, 27*cols]   +-----+-----+
                                             | t0  | t1  |      unpad: drop the rows (or columns)
                                             +-----+-----+      that only saw the zero padding
                                             | t2  | t3  |      anyres_max_N: bilinear shrink when
                                             +-----+-----+      the map exceeds 1.1 x N tiles

    packed = [ base (P rows) ; f f f ... f NL ; f f f ... f NL ; ... ]   one image_newline (NL)
                               `---- w ----'                             after every map row

    count  = P + h*w + h                  (h, w after unpad and optional shrink)
    multi-image sample: each image is one view only -> P + 1 (base + one newline)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from r4b_core.config import R4BConfig, check_pinpoints, max_tiles

Size = tuple[int, int]


def as_size(image_size, what: str = "image_size") -> Size:
    """(h, w) as Python ints from a tuple, list, tensor or array; ValueError unless two positive ints."""
    if hasattr(image_size, "tolist"):
        image_size = image_size.tolist()
    try:
        h, w = (int(x) for x in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} should be (height, width); got {image_size!r}.") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} = ({h}, {w}) must be positive.")
    return h, w


# ---------------------------------------------------------------------------------------------
# image side: canvas, resize, pad, tiles


def select_best_resolution(image_size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint (h, w) that keeps the most of the image.

    Rule: for each pinpoint, scale = min(w/W, h/H); effective = min(int(W*scale) * int(H*scale), W*H);
    wasted = h*w - effective. Keep the largest effective; on equal effective the smaller wasted wins;
    on a full tie the earlier pinpoint wins (strict comparisons while scanning in list order).
    """
    H, W = as_size(image_size)
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in check_pinpoints(pinpoints):
        scale = min(w / W, h / H)
        eff = min(int(W * scale) * int(H * scale), W * H)
        waste = h * w - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def resize_for_patching_size(image_size: Size, target: Size) -> Size:
    """Size (new_h, new_w) the image is resized to before padding onto the canvas ``target``.

    Rule: if w/W < h/H the width fills the canvas (new_w = w, new_h = min(ceil(H * w/W), h)),
    otherwise the height does (new_h = h, new_w = min(ceil(W * h/H), w)). Ties fill the height.
    """
    H, W = as_size(image_size)
    th, tw = as_size(target, "target")
    sw, sh = tw / W, th / H
    if sw < sh:
        return min(math.ceil(H * sw), th), tw
    return th, min(math.ceil(W * sh), tw)


def padding_for_patching(resized_size: Size, target: Size) -> tuple[int, int, int, int]:
    """Zero padding (top, bottom, left, right) that centres the resized image on the canvas.

    Rule: the smaller half goes first: top = (th - h) // 2, bottom = the rest (one more when odd);
    the same for left / right.
    """
    h, w = as_size(resized_size, "resized_size")
    th, tw = as_size(target, "target")
    if h > th or w > tw:
        raise ValueError(f"resized size ({h}, {w}) does not fit the canvas ({th}, {tw}).")
    top, extra_h = divmod(th - h, 2)
    left, extra_w = divmod(tw - w, 2)
    return top, top + extra_h, left, left + extra_w


def grid_shape(image_size: Size, pinpoints: Sequence[Sequence[int]], tile_size: int) -> Size:
    """(rows, cols) of tiles: the best pinpoint divided by the tile size.

    Pinpoints must be multiples of the tile size (transformers' processor would cut a partial last tile
    that its model cannot reshape); anything else is a ValueError (``config.check_pinpoints``).
    """
    if tile_size is None:  # check_pinpoints skips the multiple check without a tile size
        raise ValueError("tile_size is None; give the vision tower's image_size (a positive integer).")
    bh, bw = select_best_resolution(image_size, check_pinpoints(pinpoints, tile_size))
    return bh // tile_size, bw // tile_size


def num_views(image_size: Size, pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
    """Views of a tiled image: 1 base view + rows * cols tiles (transformers' image_size_to_num_patches)."""
    rows, cols = grid_shape(image_size, pinpoints, tile_size)
    return 1 + rows * cols


def views_per_image(config: R4BConfig, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
                    ) -> list[int]:
    """Views each image uses: 1 + anyres tiles, or 1 for an image of a multi-image sample
    (``batch_num_images[b] > 1``); image_sizes [N_images, 2] as (height, width)."""
    tiled = [True] * len(image_sizes) if batch_num_images is None else [
        int(n) == 1 for n in batch_num_images.tolist() for _ in range(int(n))
    ]
    if len(tiled) != len(image_sizes):
        raise ValueError(f"batch_num_images sums to {len(tiled)} images but image_sizes has {len(image_sizes)} rows.")
    tile = config.vision_config.image_size
    return [num_views((int(h), int(w)), config.image_grid_pinpoints, tile) if t else 1
            for (h, w), t in zip(image_sizes.tolist(), tiled)]


# ---------------------------------------------------------------------------------------------
# feature side: unpad, downscale, pack


def _unpad_crop(image_size: Size, feature_h: int, feature_w: int) -> tuple[int, int]:
    """(axis, pad): drop ``pad`` entries at both ends of axis 1 (rows) or 2 (columns) of a [D, h, w] map."""
    H, W = as_size(image_size)
    if W / H > feature_w / feature_h:  # image wider than the map: padding was added above and below
        new_h = int(round(H * (feature_w / W), 7))
        return 1, (feature_h - new_h) // 2
    new_w = int(round(W * (feature_h / H), 7))
    return 2, (feature_w - new_w) // 2


def unpadded_feature_size(image_size: Size, feature_h: int, feature_w: int) -> Size:
    """(h, w) of the feature map once the rows/columns that saw only padding are dropped.

    Rule (transformers' unpad_image): if W/H > fw/fh, new_h = int(round(H * (fw / W), 7)) and
    pad = (fh - new_h) // 2 rows go at each end, so h = fh - 2*pad (= new_h, or new_h + 1 when
    fh - new_h is odd); otherwise the same on the columns. The ``round(..., 7)`` absorbs float error
    such as 383.99999999 before ``int`` truncates. h or w may come out 0 for extreme aspect ratios.
    """
    axis, pad = _unpad_crop(image_size, feature_h, feature_w)
    return (feature_h - 2 * pad, feature_w) if axis == 1 else (feature_h, feature_w - 2 * pad)


def unpad_feature_map(features: torch.Tensor, image_size: Size) -> torch.Tensor:
    """Crop a [D, H, W] tile-grid feature map to [D, h, w] (see ``unpadded_feature_size``)."""
    if features.ndim != 3:
        raise ValueError(f"features should be [D, H, W]; got shape {tuple(features.shape)}.")
    fh, fw = features.shape[1:]
    axis, pad = _unpad_crop(image_size, fh, fw)
    return features[:, pad:fh - pad, :] if axis == 1 else features[:, :, pad:fw - pad]


def downscaled_size(h: int, w: int, max_n: int | None, patches_per_side: int) -> Size:
    """Map size after the anyres_max_N rule: unchanged unless ratio = sqrt(h*w / (N * pps^2)) > 1.1,
    then (int(h // ratio), int(w // ratio)). ``max_n=None`` (plain "anyres") never downscales."""
    if max_n is None:
        return h, w
    ratio = math.sqrt(h * w / (max_n * patches_per_side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def anyres_max_downscale(features: torch.Tensor, max_n: int | None, patches_per_side: int) -> torch.Tensor:
    """Shrink a [D, h, w] map that holds more than 1.1 x ``max_n`` tiles of features.

    Rule (transformers): ``F.interpolate(map[None], [int(h // ratio), int(w // ratio)], mode="bilinear")``
    with align_corners=False and no antialias, in the features' dtype. When the target has a zero side
    (only for absurd aspect ratios) transformers' interpolate raises; here the result is an empty map of
    that size, which is what its processor's token count assumes.
    """
    if features.ndim != 3:
        raise ValueError(f"features should be [D, h, w]; got shape {tuple(features.shape)}.")
    d, h, w = features.shape
    nh, nw = downscaled_size(h, w, max_n, patches_per_side)
    if (nh, nw) == (h, w):
        return features
    if nh == 0 or nw == 0:
        return features.new_zeros(d, nh, nw)
    return F.interpolate(features[None], [nh, nw], mode="bilinear")[0]


def pack_image_features(
    view_features: torch.Tensor,
    image_size: Size,
    image_newline: torch.Tensor,
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    patches_per_side: int,
    vision_aspect_ratio: str,
) -> torch.Tensor:
    """One image's features in the order they replace its image tokens: [N, D].

    One view (an image of a multi-image sample): base + image_newline -> [P + 1, D].
    Several views: base view (P rows), then the tiles arranged into a [D, pps*rows, pps*cols] map
    (tile (i, j) at row-block i, column-block j), unpadded, downscaled for "anyres_max_N", with
    image_newline appended after every map row, flattened row-major.
    """
    if view_features.ndim != 3:
        raise ValueError(f"view_features should be [views, patches, D]; got shape {tuple(view_features.shape)}.")
    n_views, n_patches, dim = view_features.shape
    newline = image_newline.to(view_features.device, view_features.dtype)
    if n_views == 1:
        return torch.cat((view_features[0], newline[None]), dim=0)
    side = patches_per_side
    if side * side != n_patches:
        raise ValueError(  # transformers raises the same for "default" selection on a CLS-free tower
            f"The number of patches is not consistent with the image size: {n_patches} patches per view, "
            f"expected {side} x {side}."
        )
    rows, cols = grid_shape(image_size, pinpoints, tile_size)
    if n_views - 1 != rows * cols:
        raise ValueError(
            f"image of size {tuple(as_size(image_size))} needs 1 + {rows}x{cols} views; got {n_views}."
        )
    grid = view_features[1:].view(rows, cols, side, side, dim)
    grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # [D, rows*side, cols*side]
    grid = unpad_feature_map(grid, image_size)
    grid = anyres_max_downscale(grid, max_tiles(vision_aspect_ratio), side)
    grid = torch.cat((grid, newline[:, None, None].expand(dim, grid.shape[1], 1)), dim=-1)
    return torch.cat((view_features[0], grid.flatten(1, 2).transpose(0, 1)), dim=0)


def num_image_tokens(image_size: Size, config: R4BConfig, multi_image: bool = False) -> int:
    """How many image tokens one ``<image>`` expands into; always equals the rows ``pack_image_features``
    returns for the same config (the model's splice needs that equality).

    Tiled image: P + h*w + h with (h, w) the unpadded map, downscaled by the anyres_max_N rule when
    ``config.vision_aspect_ratio`` asks for it (as LlavaOnevisionProcessor counts; R-4B's own processor
    has no downscale in its count, which agrees as long as the downscale never fires, true for R-4B's
    pinpoints). Image of a multi-image sample: P + 1.

    ``vision_feature_select_strategy == "default"`` drops the first patch of every view, so the count
    is one less, as transformers' processor counts. A CLS-free SigLIP base view then has P - 1 rows,
    which transformers' model can only pack as a single view: for a tiled image it raises, so here
    that combination is a ValueError up front.
    """
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    base = side * side
    default = config.vision_feature_select_strategy == "default"
    if multi_image:
        return base + 1 - int(default)
    if default:
        raise ValueError(
            "vision_feature_select_strategy='default' drops the first patch, which a tiled image cannot "
            "pack (transformers raises 'The number of patches is not consistent with the image size'); "
            "use 'full', or send the image in a multi-image sample."
        )
    rows, cols = grid_shape(image_size, config.image_grid_pinpoints, vc.image_size)
    h, w = unpadded_feature_size(image_size, side * rows, side * cols)
    h, w = downscaled_size(h, w, max_tiles(config.vision_aspect_ratio), side)
    return base + h * w + h
