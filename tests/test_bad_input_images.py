"""What bad images and bad model inputs get (issue 11 points 4 and 7): the model's own input checks
name the expected shape or id range, and one pixel limit holds for every image source (file, URL,
PIL image, array, processor) and every image command. Each test fails on the code before its fix.
"""

from __future__ import annotations

import functools
import http.server
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from r4b_core.cli import main
from r4b_core.cli.common import open_image
from r4b_core.generation.generate import generate
from r4b_core.models.kv_cache import KVCache
from r4b_core.models.r4b import ImageTokenMismatchError
from r4b_core.processing.image_processing import load_image
from r4b_core.processing.processor import R4BProcessor

from cli_errors import IMAGE_ID, one_error  # tests/cli_errors.py


# ---------------------------------------------------------------------------------------------
# 4. the model's own input checks


def test_image_tokens_without_pixel_values_are_refused(tiny_model):
    """Before: the image tokens ran as text, and the logits were silently wrong."""
    ids = torch.tensor([[151644, IMAGE_ID, IMAGE_ID, 100]])
    with pytest.raises(ImageTokenMismatchError, match="2 image tokens .* no pixel_values"):
        tiny_model(ids)
    # a decode step through the cache may carry a sampled image-token id: it is embedded as text, as in transformers
    cache = KVCache.for_model(tiny_model.config.text_config, 1, 8)
    with torch.no_grad():
        tiny_model(torch.tensor([[151644, 100]]), kv_cache=cache)
        assert torch.isfinite(tiny_model(torch.tensor([[IMAGE_ID]]), kv_cache=cache).logits).all()


@pytest.mark.parametrize("bad", [151936, 10**6, -1, -100])
def test_token_ids_outside_the_vocabulary_are_named(tiny_model, bad):
    """Before: IndexError "index out of range in self" on the CPU (a device-side assert on a GPU)."""
    ids = torch.tensor([[151644, 5, bad, 7]])
    with pytest.raises(ValueError, match=rf"token id {bad} at position \(0, 2\).* 151936 ids"):
        tiny_model(ids)
    with pytest.raises(ValueError, match=f"token id {bad}"):
        tiny_model.language_model(ids)
    with pytest.raises(ValueError, match=f"token id {bad}"):
        generate(tiny_model, ids, max_new_tokens=2)


@pytest.mark.parametrize("shape, dtype", [((1, 5, 3, 32, 32), torch.float32), ((1, 5, 1, 56, 56), torch.float32),
                                          ((1, 5, 3, 56, 56), torch.uint8)])
def test_pixel_values_of_the_wrong_shape_name_the_expected_one(tiny_model, shape, dtype):
    """Before: a convolution or reshape error deep in the vision tower."""
    ids = torch.tensor([[151644, IMAGE_ID, 100]])
    with pytest.raises(ValueError, match=r"pixel_values should be .*\[N_images, max_views, 3, 56, 56\]|floating"):
        tiny_model(ids, pixel_values=torch.zeros(shape, dtype=dtype), image_sizes=torch.tensor([[90, 150]]))


# ---------------------------------------------------------------------------------------------
# 7. one pixel limit for every image source


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (what a decompression bomb shows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def image_server(tmp_path):
    """An HTTP server on localhost serving ``tmp_path``; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("side", [12_000, 20_000])  # above PIL's limit; above twice it (PIL's bomb error)
def test_every_image_source_has_the_same_pixel_limit(tmp_path, image_server, side):
    """Before: a 12000^2 PNG refused by path was accepted by URL; 20000^2 by URL crashed (DecompressionBombError)."""
    path = tmp_path / "big.png"
    path.write_bytes(png_header(side, side))
    for source in (str(path), path.as_uri(), f"{image_server}/big.png"):
        with pytest.raises(ValueError, match=rf"too large \({side}x{side} = |too large;"):
            open_image(source)
    with pytest.raises(ValueError, match="too large"):
        load_image(path.read_bytes())


def test_the_limit_is_one_setting_for_files_pil_images_arrays_and_the_processor(tmp_path, image_server,
                                                                               tiny_checkpoint):
    small = Image.new("RGB", (20, 10), (1, 2, 3))
    small.save(tmp_path / "small.png")
    for source in (str(tmp_path / "small.png"), (tmp_path / "small.png").as_uri(), f"{image_server}/small.png"):
        assert open_image(source, max_pixels=200).size == (20, 10)
        with pytest.raises(ValueError, match=r"20x10 = 200 pixels.*max_pixels=199"):
            open_image(source, max_pixels=199)
    for item in (small, np.zeros((10, 20, 3), np.uint8), torch.zeros(3, 10, 20, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="200 pixels.*max_pixels=199"):
            load_image(item, max_pixels=199)
    limited = R4BProcessor.from_pretrained(tiny_checkpoint)
    limited.max_image_pixels = 199
    with pytest.raises(ValueError, match="200 pixels"):
        limited(messages=[{"role": "user", "content": [{"type": "image"}]}], images=[small])


@pytest.mark.parametrize("command", ["generate", "parity", "attention-map", "lens", "serve"])
def test_max_image_pixels_is_a_flag_of_every_image_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--max-image-pixels N" in capsys.readouterr().out


def test_generate_applies_max_image_pixels_before_loading(tmp_path, tiny_checkpoint, capsys, never_loaded):
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--image", str(tmp_path / "small.png"),
                 "--max-image-pixels", "100"]) == 1
    assert "max_pixels=100" in one_error(capsys)
