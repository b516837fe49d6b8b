"""What every ``r4b`` command shares: the parent parser of common options and the helpers behind it.

    --model PATH_OR_HUB_ID   the checkpoint (a local directory or a hub id such as YannQi/R-4B)
    --revision REV           the hub revision (branch, tag or commit) when --model is a hub id
    --device DEVICE          the torch device (default cpu)
    --dtype {auto,float32,bfloat16,float16}
                             the compute dtype (default float32); auto: the dtype in the checkpoint's
                             config.json
    --threads N              torch CPU threads (default: $OMP_NUM_THREADS, else the physical cores, fewer
                             while other processes keep the CPUs busy: r4b_core/threads.py)

Each command module adds its own options next to these and reads them through the helpers below,
so one flag means one thing in every command.
"""

from __future__ import annotations

import argparse
import math
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from r4b_core.models.r4b import R4BForConditionalGeneration
    from r4b_core.processing.processor import R4BProcessor

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_DTYPE = "float32"


class UsageError(ValueError):
    """The command line itself is inconsistent (e.g. two checkpoints given); exit status 2, as argparse's."""


def common_options() -> argparse.ArgumentParser:
    """The parent parser every subcommand is built with (``parents=[common_options()]``)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("options every r4b command takes")
    group.add_argument("--model", metavar="PATH_OR_HUB_ID",
                       help="the checkpoint: a local directory or a hub id such as YannQi/R-4B (make-synthetic: the "
                            "directory to write); without it, commands that can run on the built-in random-init "
                            "synthetic checkpoint use that (written to $R4B_CACHE, default ~/.cache/r4b, on first use)")
    group.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1 (default cpu)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES,
                       help=f"compute dtype (default {DEFAULT_DTYPE}); auto: the dtype in the checkpoint's config.json "
                            "(float32 when it names none). make-synthetic: the stored dtype (default bfloat16 for "
                            "--preset r4b, else float32)")
    group.add_argument("--threads", type=positive_int, metavar="N",
                       help="torch CPU threads (default: $OMP_NUM_THREADS if set, else the physical cores this "
                            "process may use, fewer while other processes keep the CPUs busy)")
    return parent


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from ``--threads`` / OMP_NUM_THREADS / the physical cores (r4b_core/threads.py)."""
    from r4b_core.threads import configure_threads

    choice = configure_threads(getattr(args, "threads", None))
    if choice.note is not None:  # fewer threads than cores because other processes keep the CPUs busy
        progress_to_stderr(choice.note)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_max_new_tokens(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    """``--max-new-tokens N``: the one spelling of "how many tokens to generate" in every command."""
    parser.add_argument("--max-new-tokens", type=positive_int, default=default, metavar="N",
                        help=f"{what} (default {default})")


def add_quantize(parser: argparse.ArgumentParser) -> None:
    """``--quantize {auto,none,int8}``: how the language model's linears run (r4b_core/models/fast_linears.py)."""
    parser.add_argument("--quantize", choices=("auto", "none", "int8"), default="auto",
                        help="auto (default): on a CPU, float32 / bfloat16 weights prepacked for oneDNN (same values, "
                             "2-3x faster decoding there; not with --compile); none: the weights as loaded "
                             "(F.linear, bit-identical to transformers); int8: weight-only int8 linears (bf16 "
                             "activations, a quarter of the float32 bytes per decoded token)")


def torch_device(name: str) -> torch.device:
    """``--device`` as a torch device this process can use, checked before any weights load
    (r4b_core/devices.py: one error naming the device and what this torch build offers)."""
    from r4b_core.devices import check_device

    try:
        return check_device(name)
    except ValueError as e:  # "device X ..." -> "--device X ...": the flag the user typed
        raise ValueError(f"--{e}") from None


def checkpoint_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """(local checkpoint directory, whether it is the built-in synthetic one): ``--model`` resolved
    (hub ids downloaded at ``--revision``), else the tiny synthetic checkpoint in the r4b cache."""
    from r4b_core.reference.synthetic import cached_synthetic_checkpoint
    from r4b_weights import resolve_checkpoint

    if args.model is None:
        if args.revision is not None:
            raise UsageError(f"--revision {args.revision} needs --model (a hub id); without --model the built-in "
                             "synthetic checkpoint is used.")
        return cached_synthetic_checkpoint("tiny"), True
    return resolve_checkpoint(args.model, args.revision), False


def compute_dtype(name: str | None, directory: Path | None = None) -> torch.dtype:
    """The torch dtype of ``--dtype``: None -> float32; 'auto' -> ``directory``'s config.json dtype
    (float32 without a checkpoint, e.g. for a random-init preset)."""
    from r4b_weights import resolve_dtype

    name = name or DEFAULT_DTYPE
    if name != "auto":
        return resolve_dtype(name)
    if directory is None:
        return resolve_dtype(DEFAULT_DTYPE)
    from r4b_core.config import read_config_json

    _, raw = read_config_json(directory)
    return resolve_dtype("auto", raw)


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels N``: the one decompression-bomb limit of every command that reads images, for
    every source (file, file:// or http(s) URL) and every later step (the processor's check)."""
    parser.add_argument("--max-image-pixels", type=positive_int, metavar="N",
                        help="refuse images with more pixels, before decoding them (default: PIL's limit, "
                             "89,478,485); for a trusted large image raise it")


def add_chat_prompt_options(parser: argparse.ArgumentParser, *, image: str, prompt: str, thinking: str,
                            thinking_default: str = "auto", one_image: bool = False) -> None:
    """The chat prompt of the commands that run one (generate, lens, attention-map): ``--image`` (repeatable,
    or exactly one with ``one_image``), ``--prompt``, ``--thinking-mode`` (default ``thinking_default``) and
    ``--max-image-pixels``; ``image``, ``prompt`` and ``thinking`` are their helps."""
    if one_image:
        parser.add_argument("--image", required=True, metavar="PATH_OR_URL", help=image)
    else:
        parser.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL", help=image)
    parser.add_argument("--prompt", required=True, help=prompt)
    parser.add_argument("--thinking-mode", default=thinking_default, choices=["auto", "long", "short"], help=thinking)
    add_image_options(parser)


MAX_DOWNLOAD_BYTES = 200 * 1024 * 1024  # an image URL's body is read up to this


def open_image(source: str, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a local path, a file:// URL or an http(s) URL (downloaded into memory), all
    decoded by ``image_processing.load_image`` under one pixel limit (``max_pixels``; None: PIL's)."""
    from PIL import Image

    from r4b_core.processing.image_processing import load_image

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if not scheme:
        return load_image(Path(source), max_pixels=limit)
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
        return load_image(Path(path), max_pixels=limit, name=source)
    if scheme not in ("http", "https"):
        raise ValueError(f"{source}: unsupported image URL scheme {scheme!r}; give a file path, a file:// URL or an "
                         "http(s) URL.")
    try:
        with urllib.request.urlopen(source, timeout=30) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot download the image ({e}).") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"{source}: the download is larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB; download the "
                         "image yourself and pass the file.")
    return load_image(data, max_pixels=limit, name=source)


@dataclass
class CommandSetup:
    """What a command that reads a checkpoint works out from its command line before any weights load
    (``set_up``): the device, the checkpoint directory, the compute dtype, the opened images and their
    pixel limit."""

    device: torch.device
    directory: Path
    synthetic: bool  # no --model: the built-in random-init synthetic checkpoint
    dtype: torch.dtype
    images: list[Image.Image]
    max_image_pixels: int

    def load_processor(self) -> R4BProcessor:
        """The checkpoint's processor, refusing images over the command's pixel limit."""
        from r4b_core.processing.processor import R4BProcessor

        processor = R4BProcessor.from_pretrained(self.directory)
        processor.max_image_pixels = self.max_image_pixels
        return processor

    def load_model(self, progress: bool = True) -> R4BForConditionalGeneration:
        """The checkpoint's model in the command's dtype on its device (progress lines on stderr)."""
        from r4b_core.models.r4b import R4BForConditionalGeneration

        return R4BForConditionalGeneration.from_pretrained(self.directory, dtype=self.dtype, device=self.device,
                                                           progress=progress)


def set_up(args: argparse.Namespace, image_sources: list[str] | tuple[str, ...] = (), *,
           synthetic_note: str | None = None, default_max_image_pixels: int | None = None) -> CommandSetup:
    """The one prologue of the commands that read a checkpoint, each step's errors before the next and all
    before the weights load: ``--device`` -> ``--model`` (else the synthetic checkpoint) -> ``--dtype`` ->
    every image in ``image_sources`` opened under ``--max-image-pixels`` (else ``default_max_image_pixels``,
    else PIL's limit). ``synthetic_note``: printed to stderr as "(no --model: using the random-init synthetic
    checkpoint DIR; NOTE)" when that checkpoint is used."""
    from PIL import Image

    device = torch_device(args.device)
    directory, synthetic = checkpoint_dir(args)
    dtype = compute_dtype(args.dtype, directory)
    if synthetic and synthetic_note is not None:
        progress_to_stderr(f"(no --model: using the random-init synthetic checkpoint {directory}; {synthetic_note})")
    limit = getattr(args, "max_image_pixels", None) or default_max_image_pixels or Image.MAX_IMAGE_PIXELS
    images = [open_image(source, limit) for source in image_sources]
    return CommandSetup(device, directory, synthetic, dtype, images, limit)


def seed_int(text: str) -> int:
    """argparse type: a random seed torch accepts (0 .. 2**64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**64 - 1 (what torch's generator takes), got {value}")
    return value


def progress_to_stderr(message: str) -> None:
    """Progress lines go to stderr, so stdout stays the command's result (a table or JSON)."""
    print(message, file=sys.stderr, flush=True)
