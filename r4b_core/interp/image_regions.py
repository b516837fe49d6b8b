"""Where every image token comes from: (image, view, row, col) and a box on the original picture.

The model splices each image's packed features into its image tokens in order (``model.embed``);
``anyres.pack_image_features`` fixes that order. For one image of a single-image sample::

    tokens  = [ base view: side*side patches, row-major ]            view 0, (row, col) in the side x side grid
              [ map row 0: w cells, newline ]                        views 1.., (row, col) in the packed tile map
              [ map row 1: w cells, newline ] ...  (h rows)          newline: (row, w)

where the tile map is the rows x cols tiles of the best pinpoint laid side by side
([side*rows, side*cols] cells), unpadded to [uh, uw] and, for ``anyres_max_N``, bilinearly shrunk to
[h, w]. An image of a multi-image sample is one view (the picture padded to a square with the mean colour,
then resized to a tile): side*side patches and one newline (row -1, col -1). With
``vision_feature_select_strategy == "default"`` the first patch of the base view is dropped.

Boxes, in pixels of the original picture, (x0, y0, x1, y1), x1 / y1 exclusive:

- base view: patch (r, c) saw tile pixels [c*p, (c+1)*p) x [r*p, (r+1)*p) of the picture resized to one
  tile (squashed; or padded to a square first for a multi-image sample). With R-4B's 384-pixel tiles and
  14-pixel patches the ViT sees 27*14 = 378 pixels per side: the last 6 pixels of every tile (1.6 % of
  the picture in the base view) feed no patch, and boxes leave that strip uncovered.
- tile map cell (r, c): the cell's span in the unpadded map (the footprint [r*uh/h, (r+1)*uh/h) of a
  downscaled cell, which bilinear sampling reads around its centre), shifted by the rows / columns that
  unpadding dropped, turned into canvas pixels through the tile and patch it falls in, then into picture
  pixels by undoing the centring pad and the resize (x_pic = (x_canvas - left) * W / resized_w), clipped
  to the picture. A cell kept by unpadding that saw only padding gets an empty box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r4b_core.models import anyres
from r4b_core.config import R4BConfig

BASE_VIEW = 0  # view index of the base view; tile t is view 1 + t (the order of pixel_values' views)
NEWLINE_VIEW = -1  # view index reported for image_newline tokens

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageLayout:
    """How one image's tokens are laid out, and the geometry needed to put them back on the picture.

    Sizes are (height, width). The tiling fields are None for a single-view image (multi-image sample).
    """

    image_size: tuple[int, int]
    tile_size: int
    patch_size: int
    side: int  # patches per tile side
    first_patch: int  # 1 when the "default" strategy drops the first patch of the base view, else 0
    single_view: bool
    grid: tuple[int, int] | None = None  # tiles (rows, cols)
    canvas: tuple[int, int] | None = None  # best pinpoint (bh, bw) = grid * tile_size
    resized: tuple[int, int] | None = None  # the picture resized onto the canvas, before padding
    padding: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) on the canvas
    crop: tuple[int, int] | None = None  # (rows, cols) dropped at the top / left by unpadding
    unpadded: tuple[int, int] | None = None  # map (uh, uw) after unpadding
    map_size: tuple[int, int] | None = None  # map (h, w) after the anyres_max_N downscale

    @property
    def num_base_tokens(self) -> int:
        return self.side * self.side - self.first_patch

    @property
    def num_tokens(self) -> int:
        """Tokens of this image: base patches + h*(w+1), or base patches + 1 for a single view."""
        if self.single_view:
            return self.num_base_tokens + 1
        h, w = self.map_size
        return self.num_base_tokens + h * (w + 1)


def image_layout(image_size, config: R4BConfig, multi_image: bool = False) -> ImageLayout:
    """The layout of one image (``image_size`` = original (height, width)) under ``config``.

    ``multi_image``: the image is one of several in its sample (a single padded view, no tiles).
    """
    H, W = anyres.as_size(image_size)
    vc = config.vision_config
    tile, patch = vc.image_size, vc.patch_size
    side = tile // patch
    first = int(config.vision_feature_select_strategy == "default")
    anyres.num_image_tokens((H, W), config, multi_image)  # the same ValueErrors as the processor's count
    if multi_image:
        return ImageLayout((H, W), tile, patch, side, first, True)
    canvas = anyres.select_best_resolution((H, W), config.image_grid_pinpoints)
    grid = anyres.grid_shape((H, W), config.image_grid_pinpoints, tile)
    resized = anyres.resize_for_patching_size((H, W), canvas)
    padding = anyres.padding_for_patching(resized, canvas)
    fh, fw = side * grid[0], side * grid[1]
    uh, uw = anyres.unpadded_feature_size((H, W), fh, fw)
    h, w = anyres.downscaled_size(uh, uw, anyres.max_tiles(config.vision_aspect_ratio), side)
    return ImageLayout((H, W), tile, patch, side, first, False, grid, canvas, resized, padding,
                       ((fh - uh) // 2, (fw - uw) // 2), (uh, uw), (h, w))


# ---------------------------------------------------------------------------------------------
# token map


@dataclass(frozen=True)
class ImageTokenMap:
    """One entry per image token, in sequence order (row-major over [B, T], as the model splices them).

    All fields are int64 tensors [N]. ``view``: 0 base, 1 + t tile t (for a downscaled map, the tile
    holding the cell's centre), -1 newline. ``row`` / ``col``: base: the patch in the side x side grid;
    tile: the cell in the packed tile map [h, w]; newline: (map row it ends, w), or (-1, -1) after a
    single view. ``layouts[i]`` is image i's ``ImageLayout``.
    """

    batch: torch.Tensor
    position: torch.Tensor
    image: torch.Tensor
    view: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    layouts: tuple[ImageLayout, ...]

    def __len__(self) -> int:
        return int(self.position.numel())

    @property
    def is_newline(self) -> torch.Tensor:
        return self.view == NEWLINE_VIEW

    @property
    def is_base(self) -> torch.Tensor:
        return self.view == BASE_VIEW

    def region(self, i: int) -> tuple[int, int | str, int, int]:
        """Entry i as (image, view, row, col) with view "base", "newline" or the tile index t."""
        view = int(self.view[i])
        name: int | str = "base" if view == BASE_VIEW else "newline" if view == NEWLINE_VIEW else view - 1
        return int(self.image[i]), name, int(self.row[i]), int(self.col[i])


def _tile_of_cell(layout: ImageLayout, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """View index (1 + tile) of map cells: the tile holding the centre of each cell's footprint (a centre on
    a tile edge counts for the later tile). Integer arithmetic: centre = crop + (2 * cell + 1) * u / (2 * m)."""
    (uh, uw), (h, w), (r0, c0) = layout.unpadded, layout.map_size, layout.crop
    h, w = max(h, 1), max(w, 1)  # an empty map (absurd aspect ratio) has only newlines; nothing is looked up
    twice_r = 2 * h * r0 + (2 * rows + 1) * uh  # the centre row in the padded map, times 2h
    twice_c = 2 * w * c0 + (2 * cols + 1) * uw
    tile_r = (twice_r // (2 * h * layout.side)).clamp(0, layout.grid[0] - 1)
    tile_c = (twice_c // (2 * w * layout.side)).clamp(0, layout.grid[1] - 1)
    return 1 + tile_r * layout.grid[1] + tile_c


def _entries(layout: ImageLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(view, row, col) of one image's tokens, in packing order."""
    k = torch.arange(layout.first_patch, layout.side * layout.side)
    views, rows, cols = [torch.zeros_like(k)], [k // layout.side], [k % layout.side]
    if layout.single_view:
        minus_one = torch.tensor([-1])
        views.append(minus_one)
        rows.append(minus_one)
        cols.append(minus_one)
    else:
        h, w = layout.map_size
        r = torch.arange(h).repeat_interleave(w + 1)  # [h*(w+1)]: w cells then the newline, per row
        c = torch.arange(w + 1).repeat(h)
        is_newline = c == w
        view = torch.where(is_newline, NEWLINE_VIEW, _tile_of_cell(layout, r, c.clamp(max=max(w - 1, 0))))
        views.append(view)
        rows.append(r)
        cols.append(c)
    return torch.cat(views), torch.cat(rows), torch.cat(cols)


def image_token_map(
    config: R4BConfig,
    image_sizes,
    input_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    batch_num_images=None,
) -> ImageTokenMap:
    """Map every image token of a prompt (or a batch) to its image, view, row and column.

    ``image_sizes``: [N_images, 2] original (height, width), in the order of the images (as the processor
    returns them). Give ``input_ids`` ([T] or [B, T]; image tokens are ``config.image_token_index``) or
    ``positions`` (the image-token positions: [N] for one sequence or [N, 2] (batch, position) pairs,
    in sequence order). ``batch_num_images`` (the processor's): images per sample; an image of a sample
    with several is a single view, as the model packs it (default: every image is tiled).
    """
    if (input_ids is None) == (positions is None):
        raise ValueError("give exactly one of input_ids= or positions= (the image-token positions).")
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.ndim not in (1, 2):
            raise ValueError(f"input_ids should be [T] or [B, T]; got shape {tuple(ids.shape)}.")
        where = torch.nonzero(ids.reshape(-1, ids.shape[-1]) == config.image_token_index)  # row-major order
        batch, position = where[:, 0], where[:, 1]
    else:
        pos = torch.as_tensor(positions, dtype=torch.int64)
        if pos.ndim == 1:
            batch, position = torch.zeros_like(pos), pos
        elif pos.ndim == 2 and pos.shape[1] == 2:
            batch, position = pos[:, 0], pos[:, 1]
        else:
            raise ValueError(f"positions should be [N] or [N, 2] (batch, position); got shape {tuple(pos.shape)}.")
        order = batch * (int(position.max()) + 1 if len(position) else 1) + position
        if len(order) > 1 and not bool((order[1:] > order[:-1]).all()):
            raise ValueError("positions must be distinct and in sequence order (row-major over batch, position).")

    sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
    if batch_num_images is None:
        multi = [False] * len(sizes)
    else:
        counts = [int(n) for n in torch.as_tensor(batch_num_images).reshape(-1).tolist()]
        if sum(counts) != len(sizes):
            raise ValueError(f"batch_num_images={counts} sums to {sum(counts)} but image_sizes has {len(sizes)} rows.")
        multi = [n > 1 for n in counts for _ in range(n)]
    layouts = tuple(image_layout(s, config, m) for s, m in zip(sizes, multi))
    expected = sum(layout.num_tokens for layout in layouts)
    if expected != len(position):
        raise ValueError(
            f"the prompt has {len(position)} image tokens (id {config.image_token_index}) but the {len(sizes)} "
            f"image(s) of sizes {sizes} pack into {expected}; expand each <image> to num_image_tokens(...) tokens "
            "(the processor does this) and pass the same image_sizes / batch_num_images."
        )
    parts = [_entries(layout) for layout in layouts]
    image = torch.cat([torch.full((layout.num_tokens,), i) for i, layout in enumerate(layouts)]) if layouts else \
        torch.zeros(0, dtype=torch.int64)
    view, row, col = (torch.cat([p[j] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
                      for j in range(3))
    return ImageTokenMap(batch.long(), position.long(), image.long(), view.long(), row.long(), col.long(), layouts)


# ---------------------------------------------------------------------------------------------
# boxes on the picture


def _canvas_start(layout: ImageLayout, u: float) -> float:
    """Canvas pixel where padded-map coordinate ``u`` (in cells; may be fractional) starts."""
    k = math.floor(u)
    return (k // layout.side) * layout.tile_size + (k % layout.side) * layout.patch_size + (u - k) * layout.patch_size


def _canvas_end(layout: ImageLayout, u: float) -> float:
    """Canvas pixel where a span ending at padded-map coordinate ``u`` ends (a whole cell ends at its
    last patch pixel, before the pixels at the tile's edge that no patch sees)."""
    k = math.ceil(u) - 1
    return (k // layout.side) * layout.tile_size + (k % layout.side) * layout.patch_size + (u - k) * layout.patch_size


def region_box(layout: ImageLayout, view: int | str, row: int, col: int) -> Box:
    """Box (x0, y0, x1, y1) on the original picture of one image token (see the module docstring).

    ``view``: 0 / "base" for a base-view patch, any tile (1 + t, or "tile") for a cell of the tile map;
    ``row`` / ``col`` as in ``ImageTokenMap``. Newline tokens have no box (ValueError).
    """
    if view in (NEWLINE_VIEW, "newline"):
        raise ValueError("an image_newline token has no place on the picture.")
    H, W = layout.image_size
    p, t = layout.patch_size, layout.tile_size
    if view in (BASE_VIEW, "base"):
        if not (0 <= row < layout.side and 0 <= col < layout.side):
            raise ValueError(f"base-view patch ({row}, {col}) is outside the {layout.side} x {layout.side} grid.")
        if layout.single_view:  # padded to a square of side S (centred), then resized to the tile
            s = max(H, W)
            top, left = (s - H) // 2, (s - W) // 2
            sy = sx = s / t
        else:  # squashed to the tile
            top = left = 0
            sy, sx = H / t, W / t
        x0, x1 = col * p * sx - left, (col + 1) * p * sx - left
        y0, y1 = row * p * sy - top, (row + 1) * p * sy - top
    else:
        if layout.single_view:
            raise ValueError(f"view {view!r}: the image is a single view (multi-image sample); it has no tiles.")
        h, w = layout.map_size
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"tile-map cell ({row}, {col}) is outside the {h} x {w} map.")
        (uh, uw), (r0, c0) = layout.unpadded, layout.crop
        top, _, left, _ = layout.padding
        rh, rw = layout.resized
        y0 = (_canvas_start(layout, r0 + row * uh / h) - top) * H / rh
        y1 = (_canvas_end(layout, r0 + (row + 1) * uh / h) - top) * H / rh
        x0 = (_canvas_start(layout, c0 + col * uw / w) - left) * W / rw
        x1 = (_canvas_end(layout, c0 + (col + 1) * uw / w) - left) * W / rw
    x0, x1 = min(max(x0, 0.0), W), min(max(x1, 0.0), W)
    y0, y1 = min(max(y0, 0.0), H), min(max(y1, 0.0), H)
    return x0, y0, max(x0, x1), max(y0, y1)


def token_boxes(token_map: ImageTokenMap) -> torch.Tensor:
    """Boxes of every entry of ``token_map``: float64 [N, 4] (x0, y0, x1, y1); NaN rows for newlines."""
    out = torch.full((len(token_map), 4), float("nan"), dtype=torch.float64)
    for i, (img, view, row, col) in enumerate(zip(token_map.image.tolist(), token_map.view.tolist(),
                                                  token_map.row.tolist(), token_map.col.tolist())):
        if view != NEWLINE_VIEW:
            out[i] = torch.tensor(region_box(token_map.layouts[img], view, row, col), dtype=torch.float64)
    return out


def _overlaps(edges: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """[K, 2] spans (start, end) in pixels -> [K, n_pixels]: the length of each span inside each pixel."""
    px = torch.arange(n_pixels, dtype=torch.float64)
    return (torch.minimum(edges[:, 1:], px + 1) - torch.maximum(edges[:, :1], px)).clamp(min=0)


def heat_on_picture(token_map: ImageTokenMap, values: torch.Tensor, image: int = 0) -> torch.Tensor:
    """Spread per-token ``values`` [N] (e.g. attention mass) over image ``image``'s picture: float64 [H, W].

    Each token's value is spread evenly over its box (value / box area per unit of area, pixels partly
    inside get their share), so base-view patches and tile cells add up into one density whose sum over
    the picture is the sum of the values (tokens with empty boxes and newlines add nothing). Boxes are
    separable (a column's x-span and a row's y-span), so each grid costs one [H, rows] @ [rows, cols] @
    [cols, W] product.
    """
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    if values.numel() != len(token_map):
        raise ValueError(f"values has {values.numel()} entries; the token map has {len(token_map)}.")
    if not 0 <= image < len(token_map.layouts):
        raise ValueError(f"image {image} is out of range; the map holds {len(token_map.layouts)} image(s).")
    layout = token_map.layouts[image]
    H, W = layout.image_size
    heat = torch.zeros(H, W, dtype=torch.float64)
    mine = token_map.image == image
    grids = [(token_map.is_base & mine, BASE_VIEW, (layout.side, layout.side))]
    if not layout.single_view:
        grids.append((~token_map.is_base & ~token_map.is_newline & mine, 1, layout.map_size))
    for keep, view, (n_rows, n_cols) in grids:
        if n_rows == 0 or n_cols == 0:
            continue
        grid = torch.zeros(n_rows, n_cols, dtype=torch.float64)
        grid.index_put_((token_map.row[keep], token_map.col[keep]), values[keep], accumulate=True)
        ys = torch.tensor([region_box(layout, view, r, 0)[1::2] for r in range(n_rows)], dtype=torch.float64)
        xs = torch.tensor([region_box(layout, view, 0, c)[0::2] for c in range(n_cols)], dtype=torch.float64)
        area = (ys[:, 1] - ys[:, 0])[:, None] * (xs[:, 1] - xs[:, 0])[None, :]  # [rows, cols]
        density = torch.where(area > 0, grid / area.clamp(min=1e-300), 0.0)
        heat += _overlaps(ys, H).T @ density @ _overlaps(xs, W)  # [H, rows] @ [rows, cols] @ [cols, W]
    return heat
