"""Structured output: ``response_format`` json_object / json_schema as a constraint on sampled tokens.

The grammar library is llguidance (one of the two vLLM uses; a Rust core, no torch or transformers
dependency, a JSON-schema compiler and a token-mask matcher), not a hand-written JSON state machine:

    response_format ──LLMatcher.grammar_from_json_schema──► grammar (checked once per request: a schema
    it cannot compile is a 400) ──per choice──► JSONConstraint (its own LLMatcher)
    engine step: JSONConstraint(generated ids, fp32 logits [V]) ──feed the new answer tokens, compute the
    allowed-token bitmask──► disallowed tokens -inf (serve/token_picker.py samples from the rest)

The constraint applies to the answer only: while the thinking is open (the prompt opened it, or the
model's first answer token is ``<think>`` in auto mode) nothing is masked, and whitespace-only tokens
between ``</think>`` and the JSON (the thinking budget forces the template's separator) are skipped.
Once the JSON is complete the matcher allows only the eos ids, so the answer ends there. The JSON is
compact (llguidance's ``whitespace_flexible`` off): a model cannot pad it with endless whitespace, so a
schema with bounded strings, numbers and arrays always closes within a bounded number of tokens. A response
cut by max_tokens before the JSON closed has finish_reason "length" (its text is an incomplete JSON,
as in vLLM); raise max_tokens or bound the schema (maxLength, maxItems) when that matters.

The vocabulary is handed to llguidance as bytes per token id (byte-level BPE pieces mapped back to
bytes, added tokens as their text, special ones marked), built once per server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from r4b_core.processing.qwen_tokenizer import bytes_to_unicode
from r4b_core.serve.schema import ResponseFormat, invalid


def _import_llguidance():
    try:
        import llguidance
    except ImportError:  # the serve extra brings it
        raise invalid("response_format", "structured output needs the llguidance package on the server "
                                         "(pip install 'r4b[serve]').") from None
    return llguidance


_COMPACT = {"whitespace_flexible": False}  # no whitespace between JSON tokens: bounded, as compact as json.dumps


class _Vocabulary:
    """llguidance's tokenizer of an r4b processor's ``tokenizers`` tokenizer over the model's vocab size."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        llguidance = _import_llguidance()
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        added = tokenizer.get_added_tokens_decoder()
        pieces: list[bytes] = []
        for i in range(vocab_size):
            if i in added:
                token = added[i]
                pieces.append((b"\xff" if token.special else b"") + token.content.encode())  # 0xFF: special
                continue
            piece = tokenizer.id_to_token(i)
            pieces.append(b"" if piece is None else bytes(byte_of.get(c, 0) for c in piece))

        class Wrapped:
            eos_token_id = int(eos_token_ids[0])
            bos_token_id = None
            special_token_ids = [i for i, t in added.items() if t.special]
            tokens = pieces

            def __call__(self, text: str) -> list[int]:
                return tokenizer.encode(text, add_special_tokens=False).ids

        self.vocab_size = vocab_size
        self.whitespace = {i for i, p in enumerate(pieces) if p and not p.strip()}
        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), eos_token=list(eos_token_ids))


class JSONConstraint:
    """The logits processor of one choice (see the module docstring)."""

    def __init__(self, matcher, vocabulary: _Vocabulary, think_ids: tuple[int | None, int | None],
                 in_thinking: bool) -> None:
        self.matcher, self.vocabulary = matcher, vocabulary
        self.think_start, self.think_end = think_ids
        self.in_thinking = in_thinking
        self.answer_tokens = 0  # tokens fed to the matcher
        self.seen = 0  # generated ids looked at so far
        self.may_open_thinking = not in_thinking  # auto mode: the first answer token may be <think>

    def _observe(self, token: int) -> None:
        if self.in_thinking:
            if token == self.think_end:
                self.in_thinking = False
            return
        if self.may_open_thinking and self.answer_tokens == 0 and token == self.think_start:
            self.in_thinking, self.may_open_thinking = True, False
            return
        self.may_open_thinking = False
        if self.answer_tokens == 0 and token in self.vocabulary.whitespace \
                and self.matcher.validate_tokens([token]) == 0:
            return  # the separator before the JSON
        self.matcher.consume_token(token)
        self.answer_tokens += 1

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self.seen:]:
            self._observe(token)
        self.seen = len(generated)
        if self.in_thinking or self.matcher.is_error():
            return logits
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(logits.shape[-1], self.vocabulary.vocab_size)
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        if self.may_open_thinking and self.answer_tokens == 0 and self.think_start is not None:
            allowed[self.think_start] = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


class StructuredOutputs:
    """The server's structured-output compiler (the vocabulary is built on first use)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self._vocabulary: _Vocabulary | None = None

    def factory(self, fmt: ResponseFormat, think_ids: tuple[int | None, int | None],
                in_thinking: bool) -> Callable[[], Any] | None:
        """A maker of one JSONConstraint per choice, or None for "text"; 400 when the schema does not compile."""
        if fmt.type == "text":
            return None
        llguidance = _import_llguidance()
        if self._vocabulary is None:
            self._vocabulary = _Vocabulary(self.tokenizer, self.vocab_size, self.eos_token_ids)
        vocabulary = self._vocabulary
        schema = {"type": "object"} if fmt.type == "json_object" else fmt.schema
        param = "response_format" if fmt.type == "json_object" else "response_format.json_schema.schema"
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)
        except ValueError as e:
            raise invalid(param, f"not a usable JSON schema ({e}).") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary.ll)
        if error:
            raise invalid(param, f"llguidance cannot compile this JSON schema: {error}")

        def make() -> JSONConstraint:
            return JSONConstraint(llguidance.LLMatcher(vocabulary.ll, grammar, log_level=0), vocabulary, think_ids,
                                  in_thinking)
        return make
