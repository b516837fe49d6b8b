"""Image preprocessing parity: ``torch.equal`` with transformers' PIL LLaVA-OneVision image processor
(``LlavaOnevisionImageProcessorPil``), computed in the same test on the same inputs."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from r4b_core.config import preset
from r4b_core.processing.image_processing import ImageProcessorConfig, load_image, preprocess_images

CONFIGS = {
    "r4b": ImageProcessorConfig.for_model(preset("r4b")),  # 384 tiles, R-4B's 5 pinpoints, mean = std = 0.5
    "ov": ImageProcessorConfig(),  # transformers' defaults: CLIP mean/std, LLaVA-OV's 36 pinpoints
    "tiny": ImageProcessorConfig.for_model(preset("tiny")),  # 56 tiles
}
_HF = {}


def hf(name: str) -> LlavaOnevisionImageProcessorPil:
    if name not in _HF:
        _HF[name] = LlavaOnevisionImageProcessorPil(**CONFIGS[name].to_hf_dict())
    return _HF[name]


def assert_parity(images, name: str, **ours_kwargs) -> dict:
    ours = preprocess_images(images, CONFIGS[name], **ours_kwargs)
    theirs = hf(name)(images, return_tensors="pt")
    assert ours["pixel_values"].dtype == theirs["pixel_values"].dtype == torch.float32
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"]) and ours["image_sizes"].dtype == torch.int64
    assert torch.equal(ours["batch_num_images"], theirs["batch_num_images"])
    return ours


def make_image(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    """Gradients + noise + drawn shapes (+ a varied alpha), converted to ``mode``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 13) % 256], -1)
    rgb = ((rgb + rng.integers(0, 48, (h, w, 3))) % 256).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(im)
    draw.ellipse([w * 0.2, h * 0.1, w * 0.8, h * 0.7], fill=(250, 30, 60), outline=(0, 0, 0))
    draw.rectangle([0, (h - 1) * 0.6, (w - 1) * 0.4, h - 1], fill=(20, 200, 90))
    draw.line([0, 0, w - 1, h - 1], fill=(255, 255, 0), width=3)
    alpha = ((x * 3 + y * 5) % 256 ^ rng.integers(0, 256, (h, w))).astype(np.uint8)
    alpha[: max(h // 4, 1)] = 0  # fully transparent band and fully opaque band
    alpha[-max(h // 4, 1):] = 255
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.asarray(im), alpha]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([np.asarray(im.convert("L")), alpha]), "LA")
    if mode in ("P", "P+transparency"):
        p = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        if mode == "P+transparency":
            p.info["transparency"] = int(np.asarray(p)[0, 0])
        return p
    if mode == "I;16":
        values = (x * 97 + y * 31) * 7 % 65536 + rng.integers(0, 300, (h, w))
        return Image.fromarray(values.clip(0, 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((np.asarray(im.convert("L")).astype(np.int32) * 3 - 200))
    if mode == "F":
        return Image.fromarray((np.asarray(im.convert("L")).astype(np.float32) * 1.7 - 40.5))
    return im.convert(mode)


# (width, height, mode, config): >= 20 images, sizes from 1x1 to very wide / very tall, all modes
CASES = [
    (1, 1, "RGB", "r4b"), (1, 1, "RGBA", "ov"), (1, 1, "L", "tiny"),
    (1, 500, "L", "r4b"), (500, 1, "LA", "tiny"), (1, 500, "RGB", "ov"),
    (17, 3, "P", "r4b"), (3, 17, "P+transparency", "ov"), (17, 3, "CMYK", "tiny"),
    (384, 384, "RGB", "r4b"), (384, 384, "LA", "ov"), (385, 383, "RGBA", "r4b"), (383, 385, "CMYK", "ov"),
    (768, 768, "I;16", "r4b"), (768, 768, "RGB", "ov"), (1000, 1000, "RGB", "r4b"), (1000, 1000, "P", "ov"),
    (4000, 300, "RGB", "r4b"), (300, 4000, "L", "ov"), (4000, 300, "LA", "tiny"), (300, 4000, "RGBA", "r4b"),
    (640, 480, "RGB", "tiny"), (49, 49, "1", "r4b"), (100, 37, "I", "ov"), (37, 100, "F", "tiny"),
    (2, 2, "RGBA", "tiny"), (57, 113, "P+transparency", "tiny"), (2304, 1000, "RGB", "ov"),
]


@pytest.mark.parametrize("w,h,mode,name", CASES, ids=[f"{w}x{h}-{m}-{n}" for w, h, m, n in CASES])
def test_single_image_parity(w, h, mode, name):
    out = assert_parity(make_image(w, h, mode, seed=w * 31 + h), name)
    assert out["image_sizes"].tolist() == [[h, w]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mode_on_every_config(name):
    modes = ["RGB", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16", "I", "F", "1"]
    for i, mode in enumerate(modes):
        assert_parity(make_image(97, 61, mode, seed=i), name)


def test_alpha_is_composited_on_white_for_pil_input():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(load_image(im)).min() == 255
    half = Image.new("LA", (4, 4), (0, 128))
    assert np.asarray(load_image(half))[0, 0].tolist() == [127, 127, 127]  # 0 * a + 255 * (1 - a) in PIL
    assert_parity([im, half], "r4b")


def test_default_pinpoints_are_transformers_defaults():
    default = ImageProcessorConfig()
    cls = LlavaOnevisionImageProcessorPil
    assert default.image_grid_pinpoints == cls.image_grid_pinpoints
    assert default.image_grid_pinpoints == transformers.LlavaOnevisionConfig().image_grid_pinpoints
    assert default.image_grid_pinpoints == [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    assert tuple(default.image_mean) == tuple(cls.image_mean) and tuple(default.image_std) == tuple(cls.image_std)
    assert default.background_color == (122, 116, 104) and CONFIGS["r4b"].background_color == (127, 127, 127)


# ---------------------------------------------------------------------------------------------
# numpy / torch inputs


def test_numpy_and_torch_inputs():
    rgba = np.asarray(make_image(150, 90, "RGBA", seed=3))  # (90, 150, 4)
    rgb, gray = np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., :1])
    for name in ("r4b", "tiny"):
        assert_parity(rgb, name)  # HWC uint8
        assert_parity(rgba, name)  # numpy alpha: round(a * rgb + (1 - a) * 255)
        assert_parity(gray, name)  # (H, W, 1): repeated
        assert_parity(torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(), name)  # CHW uint8
        assert_parity(torch.from_numpy(rgba.copy()).permute(2, 0, 1).contiguous(), name)
        assert_parity(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].contiguous(), name)  # a 1-image 4-D batch
    ambiguous = np.asarray(make_image(3, 40, "RGB"))[:3]  # (3, 3, 3) HWC; transformers reads it channels first
    assert_parity(ambiguous, "r4b")
    both = np.asarray(make_image(3, 4, "RGB"))  # (4, 3, 3): first axis 4 -> channels first with alpha
    assert_parity(both, "ov")
    # the numpy formula and PIL's alpha_composite agree on every (value, alpha) pair
    v, a = np.meshgrid(np.arange(256), np.arange(256))
    every = np.stack([v, 255 - v, v // 2, a], -1).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(every)), np.asarray(load_image(Image.fromarray(every, "RGBA"))))


def test_array_errors():
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="channel"):
        load_image(np.zeros((10, 10, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="unsupported image type"):
        load_image(12)
    assert np.asarray(load_image(np.full((5, 6), 9, np.uint8))).shape == (5, 6, 3)  # 2-D: grayscale


# ---------------------------------------------------------------------------------------------
# batches and multi-image samples


def test_multi_image_sample_pads_to_square_with_mean_colour():
    images = [make_image(300, 200, "RGB", 1), make_image(51, 120, "RGBA", 2), make_image(64, 64, "L", 3)]
    for name in ("r4b", "ov", "tiny"):
        out = assert_parity([images], name)
        tile = CONFIGS[name].tile_size
        assert out["pixel_values"].shape == (3, 1, 3, tile, tile) and out["batch_num_images"].tolist() == [3]


def test_batch_of_two_samples_with_different_sizes():
    a, b = make_image(1000, 100, "RGB", 4), make_image(384, 384, "P", 5)  # 1x3 grid (4 views) vs 1x2 (3 views)
    out = assert_parity([a, b], "r4b")
    assert out["pixel_values"].shape[:2] == (2, 4) and out["batch_num_images"].tolist() == [1, 1]
    assert torch.all(out["pixel_values"][1, 3] == 0)  # zero padding along the views axis
    c, d = make_image(91, 40, "LA", 6), make_image(33, 250, "RGB", 7)
    nested = assert_parity([[a], [b, c], [d]], "ov")
    assert nested["batch_num_images"].tolist() == [1, 2, 1]
    flat = preprocess_images([a, b, c, d], CONFIGS["ov"], batch_num_images=[1, 2, 1])
    assert all(torch.equal(flat[k], nested[k]) for k in flat)
    dropped = assert_parity([[a], [], [d]], "tiny")  # transformers drops empty (text-only) samples
    assert dropped["batch_num_images"].tolist() == [1, 1]


def test_grouping_errors():
    a = make_image(10, 10, "RGB")
    with pytest.raises(ValueError, match="mix"):
        preprocess_images([[a], a], CONFIGS["r4b"])
    with pytest.raises(ValueError, match="sum to"):
        preprocess_images([a, a], CONFIGS["r4b"], batch_num_images=[1, 2])
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([], CONFIGS["r4b"])


# ---------------------------------------------------------------------------------------------
# files


def _save(tmp_path, im: Image.Image, name: str, **kwargs) -> str:
    path = tmp_path / name
    im.save(path, **kwargs)
    return str(path)


def test_file_paths_follow_transformers_load_image(tmp_path):
    rgba = make_image(200, 90, "RGBA", 8)
    png = _save(tmp_path, rgba, "a.png")
    by_path = assert_parity(png, "r4b")  # transformers.image_utils.load_image: convert("RGB"), alpha dropped
    by_pil = assert_parity(Image.open(png), "r4b")  # processor's convert_to_rgb: composited on white
    assert not torch.equal(by_path["pixel_values"], by_pil["pixel_values"])
    from pathlib import Path
    assert torch.equal(preprocess_images(Path(png), CONFIGS["r4b"])["pixel_values"], by_path["pixel_values"])

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    jpg = _save(tmp_path, make_image(160, 60, "RGB", 9), "b.jpg", exif=exif, quality=90)
    out = assert_parity(jpg, "tiny")
    assert out["image_sizes"].tolist() == [[160, 60]]  # EXIF transpose applied, as transformers does
    assert_parity([[jpg, png]], "ov")


def test_unreadable_and_truncated_files(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is text, not pixels")
    with pytest.raises(ValueError, match="not_an_image.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        buf = io.BytesIO()
        make_image(300, 200, "RGB", 10).save(buf, fmt)
        path = tmp_path / f"truncated.{ext}"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(ValueError, match=rf"truncated\.{ext}.*truncated"):
            preprocess_images(str(path), CONFIGS["r4b"])
        with pytest.raises(ValueError, match=rf"truncated\.{ext}.*truncated"):  # opened lazily by the caller
            preprocess_images(Image.open(path), CONFIGS["r4b"])
        with pytest.raises(OSError, match="truncated"):  # transformers refuses it too
            hf("r4b")(str(path), return_tensors="pt")


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares width x height RGB pixels but carries almost no data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bombs_are_refused_until_the_limit_is_raised(tmp_path):
    pil_limit = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 100_000, 100_000)  # 10^10 pixels, > 2 x PIL's limit
    with pytest.raises(ValueError, match=r"bomb\.png.*too large.*max_pixels"):
        load_image(bomb)
    with pytest.raises(ValueError, match="cannot decode"):  # limit lifted: now it fails on the missing data
        load_image(bomb, max_pixels=None)
    mid = tmp_path / "mid.png"
    _png_header_only(mid, 12_000, 10_000)  # 1.2e8: between PIL's warning and error thresholds
    with pytest.raises(ValueError, match=r"12000x10000.*max_pixels"):
        load_image(mid)

    small = _save(tmp_path, make_image(60, 50, "RGB", 11), "small.png")  # 3000 pixels
    with pytest.raises(ValueError, match=r"3000 pixels.*max_pixels=2000.*raise it"):
        preprocess_images(small, CONFIGS["r4b"], max_pixels=2000)
    out = preprocess_images(small, CONFIGS["r4b"], max_pixels=3000)
    assert torch.equal(out["pixel_values"], hf("r4b")(small, return_tensors="pt")["pixel_values"])
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's global is restored


# ---------------------------------------------------------------------------------------------
# config


def test_to_hf_dict_builds_the_same_transformers_processor(tmp_path):
    d = CONFIGS["r4b"].to_hf_dict()
    assert d == {
        "size": {"height": 384, "width": 384}, "image_grid_pinpoints": preset("r4b").image_grid_pinpoints,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "resample": 3,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "do_pad": True,
        "image_processor_type": "LlavaOnevisionImageProcessor",
    }
    theirs = LlavaOnevisionImageProcessorPil(**d)
    assert dict(theirs.size)["height"] == 384 and theirs.image_grid_pinpoints == d["image_grid_pinpoints"]
    assert tuple(theirs.image_mean) == (0.5,) * 3 and theirs.resample == 3 and theirs.rescale_factor == 1 / 255

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    assert ImageProcessorConfig.from_pretrained(tmp_path) == CONFIGS["r4b"]
    image = make_image(500, 300, "RGB", 12)
    ours = preprocess_images(image, CONFIGS["r4b"])["pixel_values"]
    for kind in ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil"):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**d, "image_processor_type": kind}))
        auto = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
        assert type(auto) is LlavaOnevisionImageProcessorPil
        assert torch.equal(auto(image, return_tensors="pt")["pixel_values"], ours)


def test_reads_what_transformers_saves(tmp_path):
    LlavaOnevisionImageProcessorPil(**CONFIGS["tiny"].to_hf_dict()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "LlavaOnevisionImageProcessor"  # 5.24 strips the "Pil" suffix
    cfg = ImageProcessorConfig.from_pretrained(tmp_path)
    assert cfg.tile_size == 56 and cfg.image_grid_pinpoints == preset("tiny").image_grid_pinpoints
    assert cfg.channel_mean == [0.5] * 3 and cfg.resample == 3 and cfg.do_pad is True
    assert ImageProcessorConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json.*JSON"):
        ImageProcessorConfig.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 384, "width": 336}}))
    with pytest.raises(ValueError, match="preprocessor_config.json.*'size'"):
        ImageProcessorConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multiple of the tile size"):
        ImageProcessorConfig.from_hf_dict({"image_grid_pinpoints": [[400, 800]]})
    with pytest.raises(ValueError, match="'image_mean'"):
        ImageProcessorConfig.from_hf_dict({"image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessorConfig.from_hf_dict({"do_center_crop": True})
    kept = ImageProcessorConfig.from_hf_dict({"processor_class": "RProcessor", "image_seq_length": 729})
    assert kept.to_hf_dict()["image_seq_length"] == 729 and kept.to_hf_dict()["processor_class"] == "RProcessor"


def test_shortest_edge_size_form():
    d = {**CONFIGS["r4b"].to_hf_dict(), "size": {"shortest_edge": 384}}
    cfg = ImageProcessorConfig.from_hf_dict(d)
    assert cfg.tile_size == 384 and cfg.to_hf_dict()["size"] == {"shortest_edge": 384}
    images = [make_image(700, 100, "RGB", 13), make_image(222, 333, "L", 14)]
    for batch in (images[0], [images]):
        ours = preprocess_images(batch, cfg)
        theirs = LlavaOnevisionImageProcessorPil(**d)(batch, return_tensors="pt")
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
