"""Image parts of a request -> RGB PIL images, under the server's policy.

    data:image/...;base64,...   always accepted (decoded in memory)
    http:// https://            only with --allow-remote-images: at most ``max_bytes``, ``timeout_s`` in all
    file:///path or a path      only with --allow-local-images DIR, and only inside DIR (symlinks resolved)

Every source is decoded the same way, by ``image_processing.load_image`` on the bytes: the pixel count
is read from the header and checked against ``max_pixels`` before any pixel is decoded (decompression
bombs), then the image is fully decoded (a truncated file is an error here, not in the engine),
EXIF-rotated and converted to RGB as for a file, so a data URI of a file gives the same pixels as
``r4b generate --image`` of that file. Failures raise ``APIError(400)`` naming the content part.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from r4b_core.processing.image_processing import load_image
from r4b_core.serve.schema import APIError, ImageRef, invalid

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300; anyres downscales far below this anyway


@dataclass
class ImagePolicy:
    allow_remote: bool = False
    local_dir: Path | None = None  # None: local files are never read
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout_s: float = 10.0
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def load_request_image(ref: ImageRef, policy: ImagePolicy) -> Image.Image:
    """The RGB image of one ``image_url`` part (see the module docstring)."""
    url = ref.url.strip()
    lower = url.lower()
    if lower.startswith("data:"):
        data = _data_uri_bytes(ref, url, policy)
    elif lower.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise invalid(ref.param, "remote image URLs are not fetched by this server (start it with "
                                     "--allow-remote-images); send the image as a data: URI instead.",
                          code="image_url_not_allowed")
        data = _download(ref, url, policy)
    elif lower.startswith("file:") or "://" not in url:
        data = _local_file_bytes(ref, url, policy)
    else:
        raise invalid(ref.param, f"unsupported URL scheme {url.split(':', 1)[0]!r}; use a data: URI"
                                 f"{' or http(s)' if policy.allow_remote else ''}.")
    return decode_image_bytes(data, ref.param, policy.max_pixels)


def decode_image_bytes(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Encoded image bytes -> RGB PIL image through ``image_processing.load_image`` (the one decoder of every
    image source: size checked from the header first); too many pixels or undecodable data -> APIError(400)."""
    try:
        return load_image(data, max_pixels=max_pixels, name="the image")
    except ValueError as e:
        too_large = "too large" in str(e)
        hint = " (the server's --max-image-pixels)" if too_large else ""
        raise invalid(param, f"{e}{hint}" if too_large else f"cannot decode the image: {e}",
                      code="image_too_large" if too_large else "invalid_image") from None


def _data_uri_bytes(ref: ImageRef, url: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header.lower():
        raise invalid(ref.param, "a data: URI must be base64-encoded: data:image/png;base64,<data>.",
                      code="invalid_image")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise invalid(ref.param, f"the image is larger than {policy.max_bytes} bytes.", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid(ref.param, f"the data: URI is not valid base64 ({e}).", code="invalid_image") from None


def _download(ref: ImageRef, url: str, policy: ImagePolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "r4b-serve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise invalid(ref.param, f"the remote image is {length} bytes, over the limit of "
                                         f"{policy.max_bytes}.", code="image_too_large")
            chunks, total = [], 0
            while chunk := response.read(65536):
                total += len(chunk)
                if total > policy.max_bytes:
                    raise invalid(ref.param, f"the remote image is over the limit of {policy.max_bytes} bytes.",
                                  code="image_too_large")
                if time.monotonic() > deadline:
                    raise invalid(ref.param, f"downloading the image took more than {policy.timeout_s:g} s.",
                                  code="image_download_timeout")
                chunks.append(chunk)
            return b"".join(chunks)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise invalid(ref.param, f"cannot download the image ({e}).", code="image_download_failed") from None


def _local_file_bytes(ref: ImageRef, url: str, policy: ImagePolicy) -> bytes:
    if policy.local_dir is None:
        raise invalid(ref.param, "local files are not read by this server (start it with --allow-local-images DIR "
                                 "to allow a directory); send the image as a data: URI instead.",
                      code="image_url_not_allowed")
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.lower().startswith("file:") else url
    root = policy.local_dir.resolve()
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()  # symlinks resolved before the check
    if not path.is_relative_to(root):
        raise invalid(ref.param, f"{raw!r} is outside the directory the server may read ({root}).",
                      code="image_url_not_allowed")
    try:
        if path.stat().st_size > policy.max_bytes:
            raise invalid(ref.param, f"{raw!r} is larger than {policy.max_bytes} bytes.", code="image_too_large")
        return path.read_bytes()
    except FileNotFoundError:
        raise invalid(ref.param, f"no such file {raw!r} in {root}.", code="invalid_image") from None
    except IsADirectoryError:
        raise invalid(ref.param, f"{raw!r} is a directory, not an image file.", code="invalid_image") from None
    except OSError as e:
        raise invalid(ref.param, f"cannot read {raw!r} ({e}).", code="invalid_image") from None
