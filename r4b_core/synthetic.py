"""Random-init checkpoints in R-4B's exact HF layout: the offline stand-in for the real weights.

``make_synthetic_checkpoint(dir, preset="tiny", seed=0)`` writes

    config.json                 R4BConfig.to_hf_dict() (architectures RForConditionalGeneration, ...)
    model.safetensors           R-4B tensor names (r4b_spec.md §1.6); sharded + index above the threshold
    preprocessor_config.json    the image processor settings matching the config (tile size, pinpoints)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                a small byte-level BPE whose special tokens sit at Qwen3's real ids
                                (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
                                <think> 151667, </think> 151668) and <image> at the config's image token

The weights are drawn so that the logits are not degenerate: unit-variance-preserving Linear
weights, N(0, 1) embeddings, norm weights of 1 + N(0, 0.1) (so that, e.g., applying QK-norm after
RoPE changes the result), small biases. Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig, preset
from r4b_core.model import R4BForConditionalGeneration
from r4b_core.qwen3 import RMSNorm

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


def build_synthetic_model(config: R4BConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> R4BForConditionalGeneration:
    """An R4BForConditionalGeneration with synthetic weights, in ``dtype``, on the CPU."""
    with torch.device("meta"):
        model = R4BForConditionalGeneration(config)
    model = model.to(dtype).to_empty(device="cpu")  # allocate once, directly in the target dtype
    init_synthetic_weights_(model, seed)
    if config.tie_lm_head:
        model.language_model.tie_weights()
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


def make_synthetic_checkpoint(
    directory: str | Path,
    preset_name: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: R4BConfig | None = None,
) -> Path:
    """Write a random-init R-4B checkpoint (weights, configs, tokenizer) to ``directory``."""
    from r4b_core.image_processing import ImageProcessorConfig
    from r4b_weights.export import save_hf_checkpoint

    directory = Path(directory)
    config = config if config is not None else preset(preset_name)
    model = build_synthetic_model(config, seed, dtype)
    save_hf_checkpoint(model, directory, max_shard_bytes=max_shard_bytes)
    processor_config = ImageProcessorConfig.for_model(config).to_hf_dict()
    (directory / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n", encoding="utf-8")
    write_synthetic_tokenizer(directory, "<image>", config.image_token_index)
    return directory
