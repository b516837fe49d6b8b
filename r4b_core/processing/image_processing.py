"""Image preprocessing, bit for bit as transformers' PIL LLaVA-OneVision image processor.

The reference is ``LlavaOnevisionImageProcessorPil`` (transformers 5.24; the slow
``LlavaOnevisionImageProcessor`` in 4.55). The same steps, in the same dtypes:

1. to RGB uint8 (``load_image``; see there for what happens to each mode and to alpha);
2. one image in its sample: canvas = best pinpoint; PIL resize (``resample``, bicubic) to fit the
   canvas keeping the aspect ratio, zero pad (uint8) to the canvas, cut into square tiles row-major;
   the base view is the original image PIL-resized straight to one tile. Views = [base, tiles...];
   several images in a sample: each is padded to a square with the mean colour ``int(mean * 255)``
   and resized to one tile (a single view);
3. per view: resize to the tile (a no-op copy for tiles), ``(x.astype(float64) * rescale_factor)``
   cast to float32, then ``(x - mean) / std`` in float32;
4. batch: views zero-padded to the longest image -> [N_images, max_views, 3, S, S].

``ImageProcessorConfig.to_hf_dict()`` is a ``preprocessor_config.json`` that
``LlavaOnevisionImageProcessorPil(**d)`` accepts and turns into the same processor. Its
``image_processor_type`` is "LlavaOnevisionImageProcessor" (what 5.24's ``to_dict`` writes, and the
slow class in 4.55). In 5.24 no ``image_processor_type`` value forces the PIL class: AutoImageProcessor
maps "...ImageProcessor", "...ImageProcessorPil" and "...ImageProcessorFast" to the same
{pil, torchvision} pair and picks torchvision when it is installed, so pass ``backend="pil"``.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from dataclasses import dataclass, field, fields
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from r4b_core.models import anyres
from r4b_core.config import R4BConfig, check_pinpoints
from r4b_core.json_io import MANUAL, is_int, is_number, read_fields, read_json

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # transformers' class defaults, used for absent keys
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA_OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
_OPEN_LOCK = threading.Lock()  # guards the temporary change of PIL's global decompression-bomb limit
_PIL_LIMIT: Any = object()  # default max_pixels: PIL's Image.MAX_IMAGE_PIXELS at call time


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class ImageProcessorConfig:
    """``preprocessor_config.json`` keys. Absent keys take transformers' class defaults (CLIP mean/std,
    LLaVA-OV's 36 pinpoints), exactly as ``LlavaOnevisionImageProcessorPil`` does."""

    size: dict = field(default_factory=lambda: {"height": 384, "width": 384})
    image_grid_pinpoints: list = field(default_factory=lambda: copy.deepcopy(LLAVA_OV_PINPOINTS))
    image_mean: list | float = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list | float = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = True
    do_center_crop: bool | None = None
    crop_size: dict | None = None
    image_processor_type: str = "LlavaOnevisionImageProcessor"
    processor_class: str | None = None
    extra: dict = field(default_factory=dict, metadata=MANUAL)  # keys we do not interpret, written back

    def __post_init__(self) -> None:
        size = self.size
        if not isinstance(size, dict) or set(size) not in ({"height", "width"}, {"shortest_edge"}):
            raise ValueError(f"key 'size' = {size!r} should be {{'height': S, 'width': S}} or {{'shortest_edge': S}}.")
        values = list(size.values())
        if any(not is_int(v) or v <= 0 for v in values) or len(set(values)) != 1:
            raise ValueError(f"key 'size' = {size!r}: tiles are square; height and width must be one positive int.")
        if self.do_center_crop:
            raise ValueError("key 'do_center_crop' = true is not supported by LLaVA-OneVision preprocessing.")
        if self.crop_size is not None and dict(self.crop_size).get("height", self.tile_size) != self.tile_size:
            raise ValueError(f"key 'crop_size' = {self.crop_size!r} would change the tile size; it must match 'size'.")
        for key in ("image_mean", "image_std"):
            v = getattr(self, key)
            ok = is_number(v) or (isinstance(v, (list, tuple)) and len(v) == 3 and all(is_number(x) for x in v))
            if not ok:
                raise ValueError(f"key '{key}' = {v!r} should be a number or a list of 3 numbers.")
        if any(x == 0 for x in self.channel_std):
            raise ValueError(f"key 'image_std' = {self.image_std!r} has a zero.")
        if not is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"key 'rescale_factor' = {self.rescale_factor!r} should be a positive number.")
        if not is_int(self.resample) or not 0 <= self.resample <= 5:
            raise ValueError(f"key 'resample' = {self.resample!r} should be a PIL resampling filter id (0..5).")
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"key '{key}' = {getattr(self, key)!r} should be true or false.")
        check_pinpoints(self.image_grid_pinpoints, self.tile_size)

    @property
    def tile_size(self) -> int:
        return next(iter(self.size.values()))

    @property
    def channel_mean(self) -> list[float]:
        return [float(self.image_mean)] * 3 if is_number(self.image_mean) else [float(x) for x in self.image_mean]

    @property
    def channel_std(self) -> list[float]:
        return [float(self.image_std)] * 3 if is_number(self.image_std) else [float(x) for x in self.image_std]

    @property
    def background_color(self) -> tuple[int, int, int]:
        """Fill of the pad-to-square used for multi-image samples: ``int(mean * 255)`` per channel."""
        return tuple(int(x * 255) for x in self.channel_mean)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "preprocessor_config.json") -> "ImageProcessorConfig":
        """Walk the fields (absent or null key -> the field's default, values type-checked against the
        annotation), keep the other keys in ``extra``, then check the values; errors name ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object at the top level.")
        try:
            rest = copy.deepcopy(d)
            return cls(**read_fields(cls, rest, error=ValueError), extra=rest)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ImageProcessorConfig":
        """Read ``directory/preprocessor_config.json``."""
        path = Path(directory) / "preprocessor_config.json"
        return cls.from_hf_dict(read_json(path, what=f"the image processor config of {directory}"), source=str(path))

    @classmethod
    def for_model(cls, config: R4BConfig) -> "ImageProcessorConfig":
        """Defaults consistent with a model config: its tile size and pinpoints, mean = std = 0.5."""
        tile = config.vision_config.image_size
        return cls(size={"height": tile, "width": tile},
                   image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

    def to_hf_dict(self) -> dict:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        out.update(copy.deepcopy(self.extra))
        return out




# ---------------------------------------------------------------------------------------------
# loading and RGB conversion


def load_image(x: Any, max_pixels: int | None = _PIL_LIMIT, name: str | None = None) -> Image.Image:
    """Any supported input as an RGB PIL image, converted the way transformers converts that input.

    ``max_pixels`` is one limit for every kind of input (default: PIL's ``Image.MAX_IMAGE_PIXELS``, about
    89.5 million; pass a larger number, or None for no limit): an image with more pixels is a ValueError
    naming its size and the limit, raised from the header before any pixel is decoded (decompression
    bombs) for files and bytes, and before any conversion for PIL images and arrays. ``name``: what the
    messages call the input (e.g. the URL it was downloaded from).

    - file path (str or Path): as ``transformers.image_utils.load_image`` (which the image processor
      uses for strings): EXIF orientation applied, then ``convert("RGB")``: alpha is DROPPED, not
      composited. URLs and base64 strings are not fetched.
    - encoded bytes (a downloaded file): decoded in memory exactly as a file path is.
    - PIL image: as the processor's ``convert_to_rgb``: with an alpha band or a "transparency" entry
      the image goes through RGBA and is alpha-composited onto WHITE; every other mode
      (L, P, CMYK, I;16, I, F, 1, ...) is ``convert("RGB")`` (PIL clips I/I;16/F to 0..255).
      No EXIF transpose.
    - numpy array / torch tensor, uint8, (H, W, C) or (C, H, W) with C in 1, 3, 4: the layout is
      inferred as transformers does (channels first when the first axis is 1, 3 or 4, even if the last
      one is too). 1 channel is repeated; 4 channels are composited onto white as
      ``round(a * rgb + (1 - a) * 255)`` with a = alpha / 255 in float64. A 2-D array is grayscale
      (transformers rejects it). Other dtypes are refused (transformers quantises float input twice).
    """
    if max_pixels is _PIL_LIMIT:
        max_pixels = Image.MAX_IMAGE_PIXELS
    if isinstance(x, (str, Path)):
        path = Path(x)
        shown = repr(str(x)) if str(x) != str(x).strip() else str(path)  # a stray space is visible when quoted
        if path.is_dir():
            raise IsADirectoryError(f"{shown}: is a directory, not an image file; give the path of one image file.")
        if not path.is_file():
            raise FileNotFoundError(f"{shown}: no such image file.")
        return _decode(lambda: Image.open(path), name or str(path), max_pixels)
    if isinstance(x, (bytes, bytearray, memoryview)):
        return _decode(lambda: Image.open(io.BytesIO(bytes(x))), name or "the image data", max_pixels)
    if isinstance(x, Image.Image):
        _check_pixels(x.width, x.height, name or getattr(x, "filename", "") or "the PIL image", max_pixels)
        try:
            if "A" in x.getbands() or x.info.get("transparency") is not None:
                rgba = x.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return x.convert("RGB")
        except (OSError, SyntaxError) as e:
            name = getattr(x, "filename", "") or "the PIL image"
            raise ValueError(f"{name}: cannot decode the image (truncated or corrupt file): {e}") from None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        rgb = _array_to_rgb(x)
        _check_pixels(rgb.shape[1], rgb.shape[0], name or "the image array", max_pixels)
        return Image.fromarray(rgb)
    raise ValueError(
        f"unsupported image type {type(x).__name__}; pass a PIL image, a file path, a numpy array or a torch tensor."
    )


def _too_large(label: str, max_pixels: int | None, size: str = "") -> ValueError:
    return ValueError(
        f"{label}: image is too large{size}; the limit is max_pixels={max_pixels} (decompression bomb guard). "
        "If you trust the image, raise it: --max-image-pixels N on the command line, load_image(..., max_pixels=N) "
        "or R4BProcessor.max_image_pixels = N in Python (None: no limit)."
    )


def _check_pixels(width: int, height: int, label: str, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise _too_large(label, max_pixels, f" ({width}x{height} = {width * height} pixels)")


def _decode(opener: Callable[[], Image.Image], label: str, max_pixels: int | None) -> Image.Image:
    """An encoded image (file or bytes) -> RGB: the size is checked from the header before decoding."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            image = opener()
        except Image.DecompressionBombError:
            image = None
        except UnidentifiedImageError:
            raise ValueError(f"{label}: not an image file PIL can read.") from None
        except OSError as e:
            raise ValueError(f"{label}: cannot open the image ({e}).") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if image is None:
        raise _too_large(label, max_pixels)
    if max_pixels is not None and image.width * image.height > max_pixels:
        image.close()
        _check_pixels(image.width, image.height, label, max_pixels)
    try:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"{label}: cannot decode the image (truncated or corrupt file): {e}") from None
    finally:
        image.close()


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, C) or (C, H, W) -> contiguous (H, W, 3) uint8, as transformers' convert_to_rgb."""
    if a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255); got dtype {a.dtype}. Convert it, or pass a PIL image.")
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim != 3:
        raise ValueError(f"an image array should have 2 or 3 dimensions; got shape {a.shape}.")
    elif a.shape[0] in (1, 3, 4):  # channels first wins when both ends could be channels
        a = np.moveaxis(a, 0, -1)
    elif a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot tell the channel axis of an image of shape {a.shape}; expected 1, 3 or 4 channels.")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image of shape {a.shape}.")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------
# preprocessing


def _resize(a: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """PIL resize of an (H, W, 3) uint8 array to (h, w); PIL returns a copy when the size is unchanged."""
    h, w = size
    return np.asarray(Image.fromarray(a).resize((w, h), resample=resample))


def _views_for_tiling(a: np.ndarray, cfg: ImageProcessorConfig) -> list[np.ndarray]:
    """[base, tile_0, ...] of one image of a single-image sample, all uint8 (H, W, 3)."""
    tile = cfg.tile_size
    canvas = anyres.select_best_resolution(a.shape[:2], cfg.image_grid_pinpoints)
    resized = _resize(a, anyres.resize_for_patching_size(a.shape[:2], canvas), cfg.resample)
    top, bottom, left, right = anyres.padding_for_patching(resized.shape[:2], canvas)
    padded = np.pad(resized, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=0)
    tiles = [padded[i:i + tile, j:j + tile] for i in range(0, canvas[0], tile) for j in range(0, canvas[1], tile)]
    return [_resize(a, (tile, tile), cfg.resample)] + tiles


def _pad_to_square(a: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Centre the image on a square of ``color`` (the smaller half of the margin first)."""
    h, w = a.shape[:2]
    if h == w:
        return a
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=a.dtype)
    out[...] = np.asarray(color, dtype=a.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = a
    return out


def _finish_view(v: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """Resize to the tile, rescale (float64 product cast to float32), normalize in float32; -> (3, S, S)."""
    if cfg.do_resize:
        v = _resize(v, (cfg.tile_size, cfg.tile_size), cfg.resample)
    if cfg.do_rescale:
        v = (v.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float32)
        mean = np.asarray(cfg.channel_mean, dtype=v.dtype)
        std = np.asarray(cfg.channel_std, dtype=v.dtype)
        v = (v - mean) / std
    return np.ascontiguousarray(v.transpose(2, 0, 1))


def _group(images: Any, batch_num_images: list[int] | None) -> list[list[Any]]:
    """Images as samples (lists), following transformers' rules for the accepted nestings."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)  # a batch: one sample per image (transformers crashes for more than one)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given.")
    nested = [isinstance(x, (list, tuple)) for x in images]
    if any(nested):
        if not all(nested):
            raise ValueError("mix of images and lists of images; give a list per sample or a flat list of images.")
        samples = [list(x) for x in images if len(x)]  # transformers drops empty (text-only) samples
        if batch_num_images is not None and list(batch_num_images) != [len(s) for s in samples]:
            raise ValueError(
                f"batch_num_images={list(batch_num_images)} disagrees with the nesting {[len(s) for s in samples]}."
            )
        if not samples:
            raise ValueError("no images given (every sample is empty).")
        return samples
    if batch_num_images is None:
        return [[x] for x in images]
    counts = [int(n) for n in batch_num_images]
    if any(n <= 0 for n in counts) or sum(counts) != len(images):
        raise ValueError(f"batch_num_images={counts} should be positive and sum to the {len(images)} images given.")
    starts = np.cumsum([0] + counts)
    return [list(images[s:s + n]) for s, n in zip(starts, counts)]


def preprocess_images(
    images: Any,
    config: ImageProcessorConfig,
    batch_num_images: list[int] | None = None,
    max_pixels: int | None = _PIL_LIMIT,
) -> dict[str, torch.Tensor]:
    """``pixel_values`` [N_images, max_views, 3, S, S] (float32; uint8 if neither rescale nor normalize),
    ``image_sizes`` int64 [N_images, 2] (original (h, w) after RGB loading), ``batch_num_images`` int64 [B].

    ``images``: one image; a flat list (one image per sample); a list of lists (one list per sample; empty
    samples are dropped as transformers drops them); or a flat list plus ``batch_num_images``.
    A sample with one image is tiled (1 + rows*cols views); every image of a multi-image sample is
    padded to a square with the mean colour and gives a single view. ``max_pixels`` applies to every
    image, whatever its kind (see ``load_image``).
    """
    if max_pixels is _PIL_LIMIT:
        max_pixels = Image.MAX_IMAGE_PIXELS
    samples = _group(images, batch_num_images)
    pixel_values, sizes = [], []
    for sample in samples:
        for item in sample:
            if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                raise ValueError("a 4-D array inside a list is ambiguous; give one image per entry.")
            if config.do_convert_rgb:
                rgb = np.asarray(load_image(item, max_pixels=max_pixels))
            else:
                rgb = _require_rgb(item, max_pixels)
            sizes.append(rgb.shape[:2])
            if len(sample) == 1:
                views = _views_for_tiling(rgb, config)
            else:
                views = [_pad_to_square(rgb, config.background_color)]
            finished = [_finish_view(v, config) for v in views]
            if len({v.shape for v in finished}) != 1:
                raise ValueError("with do_resize=false the views of an image differ in size and cannot be stacked.")
            pixel_values.append(np.stack(finished))
    max_views = max(len(p) for p in pixel_values)
    if not config.do_pad and any(len(p) != max_views for p in pixel_values):
        raise ValueError("images have different numbers of views and do_pad is false; they cannot be batched.")
    padded = [np.pad(p, ((0, max_views - len(p)), (0, 0), (0, 0), (0, 0))) for p in pixel_values]
    if len({p.shape for p in padded}) != 1:
        raise ValueError("views of different sizes cannot be batched (do_resize is false?).")
    return {
        "pixel_values": torch.from_numpy(np.stack(padded)),
        "image_sizes": torch.tensor(sizes, dtype=torch.int64),
        "batch_num_images": torch.tensor([len(s) for s in samples], dtype=torch.int64),
    }


def _require_rgb(item: Any, max_pixels: int | None) -> np.ndarray:
    """do_convert_rgb=false: the input must already be 3-channel RGB uint8."""
    if isinstance(item, (str, Path)):
        return np.asarray(load_image(item, max_pixels=max_pixels))  # file loading always converts, as transformers
    if isinstance(item, Image.Image):
        if item.mode != "RGB":
            raise ValueError(f"do_convert_rgb is false but the image has mode {item.mode!r}; only RGB is usable as is.")
        _check_pixels(item.width, item.height, getattr(item, "filename", "") or "the PIL image", max_pixels)
        return np.asarray(item)
    rgb = np.asarray(load_image(item, max_pixels=max_pixels))
    channels = (item.shape[0] if item.shape[0] in (1, 3, 4) else item.shape[-1]) if item.ndim == 3 else 1
    if channels != 3:
        raise ValueError(f"do_convert_rgb is false but the array has {channels} channel(s); only RGB is usable as is.")
    return rgb
