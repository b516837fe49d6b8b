"""Prompts and images -> model inputs (ids -> text too): the R4BProcessor.

    messages ──chat template (jinja2 sandbox, thinking_mode)──► prompt text with literal <image>
    text ──────────────────────────────────────────────────────► prompt text with literal <image>
    ── encode_with_images (shared with training_data.build_training_example) ──────────────────────
    | placeholders vs images checked; images ──preprocess_images──► pixel_values, image_sizes
    | (h, w after RGB loading), batch_num_images; each <image> ──► num_image_tokens(image_size,
    | config, multi_image) copies of the image token; tokenizer.json (tokenizers) with the bos rule
    | ──► ids (image-token count checked)
    ids ──left padding──► input_ids, attention_mask [B, T]

Everything is read from the checkpoint (DESIGN.md decision 10):
- ``tokenizer.json`` through the ``tokenizers`` library; added tokens from its ``added_tokens`` plus any in
  ``tokenizer_config.json``'s ``added_tokens_decoder`` (they must agree on ids); named special tokens
  (``eos_token``, ``pad_token``, ...) from ``tokenizer_config.json``;
- the image token id from ``config.json``, checked against the tokenizer's id for ``<image>``;
- image settings from ``preprocessor_config.json``, checked against ``config.json`` (tile size and
  pinpoints decide how many tokens an image costs, so a disagreement would break the splice);
- stop ids from ``generation_config.json`` (``eos_token_id``), else the tokenizer's eos token; the file is
  read once, kept as ``processor.generation_config`` (generation_config.py) for generate / chat / the CLI;
- the chat template from ``chat_template.jinja``, else ``chat_template.json``, else
  ``tokenizer_config.json``; ``BUILTIN_CHAT_TEMPLATE`` when the checkpoint has none.

The chat-template machinery (jinja environment, lookup, the built-in template) is in chat_template.py;
messages -> conversations and their images in conversation.py; supervised
examples and their batches in training_data.py; the thinking split of outputs in chat.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r4b_core.models import anyres
from r4b_core.processing.chat_template import (  # noqa: F401  (BUILTIN_CHAT_TEMPLATE, ChatTemplateError: re-exported)
    BUILTIN_CHAT_TEMPLATE,
    ChatTemplateError,
    find_chat_template,
    render_chat_template,
)
from r4b_core.config import R4BConfig
from r4b_core.processing.conversation import (
    images_per_sample,
    as_conversations,
    check_unicode,
    conversation_images,
)
from r4b_core.generation_config import GenerationConfig
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.json_io import read_json_if_present
from r4b_core.processing.prompt_segments import (RenderedPrompt, encode_prompt, expand_placeholders, placeholder_starts,
                                     plain_text_tokenizer, render_prompt)

THINKING_MODES = ("auto", "long", "short")
IMAGE_TOKEN = "<image>"
THINK_START, THINK_END = "<think>", "</think>"  # plain added tokens in Qwen3 (decoding keeps them)

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES), passed to templates by these names
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---------------------------------------------------------------------------------------------
# thinking modes


def check_thinking_mode(thinking_mode: str) -> None:
    """A ValueError naming the allowed modes unless ``thinking_mode`` is one of them."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {', '.join(map(repr, THINKING_MODES))}; got {thinking_mode!r}.")


# ---------------------------------------------------------------------------------------------
# reading the checkpoint


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict (its "content")."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(directory: Path, tokenizer_config: dict):
    """``tokenizer.json`` with the added tokens of ``tokenizer_config.json`` that it lacks (ids must agree)."""
    from tokenizers import AddedToken, Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in {directory} (r4b reads the fast-tokenizer file).")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: the tokenizers library cannot read it ({e}).") from None
    present = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    declared = tokenizer_config.get("added_tokens_decoder") or {}
    for key, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
        want, content = int(key), _token_text(entry)
        if content is None:
            continue
        if content not in present:
            flags = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
            token = AddedToken(content, special=bool(entry.get("special", False)), **flags)
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
        got = tokenizer.token_to_id(content)
        if got != want:
            raise ValueError(
                f"{directory / 'tokenizer_config.json'} puts added token {content!r} at id {want} but "
                f"{path} gives it id {got}; the two tokenizer files disagree."
            )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# the processor


@dataclass
class EncodedPrompt:
    """One prompt tokenized with its ``<image>`` placeholders expanded (``R4BProcessor.encode_with_images``)."""

    ids: list[int]
    token_starts: list[int]  # per token: the character offset in the expanded text where it starts
    marks: list[int]  # the requested character positions of the prompt, moved into the expanded text


class R4BProcessor:
    """Tokenizer + chat template + image preprocessing for R-4B; see the module docstring."""

    def __init__(self, tokenizer, config: R4BConfig, image_config: ImageProcessorConfig,
                 chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None,
                 eos_token_ids: Sequence[int] | None = None, image_token: str = IMAGE_TOKEN,
                 generation_config: GenerationConfig | None = None,
                 parse_special_tokens_in_content: bool = False) -> None:
        from PIL import Image

        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.parse_special_tokens_in_content = parse_special_tokens_in_content  # see render_prompt
        self.max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS  # every image's pixel limit (None: no limit)
        self._plain_tokenizer = None  # the tokenizer without added tokens, made on first need
        self.config = config
        self.image_config = image_config
        self.chat_template = chat_template  # None: BUILTIN_CHAT_TEMPLATE is used
        self.special_tokens = dict(special_tokens or {})  # template variables: eos_token, pad_token, ...
        self.image_token = image_token
        self.image_token_id = config.image_token_index
        self.generation_config = generation_config or GenerationConfig()  # generation_config.json, read once
        eos_id, pad_id = self.special_token_id("eos_token"), self.special_token_id("pad_token")
        if eos_token_ids is None:  # the argument, else generation_config.json's, else the tokenizer's eos token
            eos_token_ids = self.generation_config.eos_token_id or ([] if eos_id is None else [eos_id])
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        # no pad token: the first stop id (padding only ever sits under attention_mask == 0)
        self.pad_token_id = pad_id if pad_id is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    def special_token_id(self, name: str) -> int | None:
        """Id of a named special token ("eos_token", "pad_token", ...); None when the tokenizer names none."""
        text = self.special_tokens.get(name)
        if text is None:
            return None
        token_id = self.tokenizer.token_to_id(text)
        if token_id is None:
            raise ValueError(f"the tokenizer config names {name} = {text!r} but the vocabulary has no such token.")
        return token_id

    @property
    def template_source(self) -> str:
        return self.chat_template if self.chat_template is not None else BUILTIN_CHAT_TEMPLATE

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, revision: str | None = None,
                        parse_special_tokens_in_content: bool = False) -> "R4BProcessor":
        """Read the processor from a checkpoint directory or hub id (see the module docstring).
        ``parse_special_tokens_in_content``: see ``render_prompt``."""
        from r4b_weights.hub import resolve_checkpoint

        directory = resolve_checkpoint(path_or_repo, revision)
        config = R4BConfig.from_pretrained(directory)
        image_config = ImageProcessorConfig.from_pretrained(directory)
        _check_image_config(directory, config, image_config)
        tokenizer_config = read_json_if_present(directory / "tokenizer_config.json") or {}
        tokenizer = load_tokenizer(directory, tokenizer_config)

        special_tokens = _special_tokens(directory, tokenizer_config)
        processor_config = read_json_if_present(directory / "processor_config.json") or {}
        image_token = processor_config.get("image_token") or IMAGE_TOKEN
        token_id = tokenizer.token_to_id(image_token)
        if token_id is None or tokenizer.encode(image_token, add_special_tokens=False).ids != [token_id]:
            raise ValueError(
                f"{directory / 'tokenizer.json'} has no added token {image_token!r}; config.json expects it at "
                f"id {config.image_token_index}."
            )
        if token_id != config.image_token_index:
            raise ValueError(
                f"image token mismatch: {directory / 'config.json'} says image_token_index = "
                f"{config.image_token_index} but {directory / 'tokenizer.json'} encodes {image_token!r} as id "
                f"{token_id}; the model would not find the image tokens the processor writes."
            )

        generation_config = GenerationConfig.from_pretrained(directory)
        template, _ = find_chat_template(directory, tokenizer_config)
        return cls(tokenizer, config, image_config, chat_template=template, special_tokens=special_tokens,
                   image_token=image_token, generation_config=generation_config,
                   parse_special_tokens_in_content=parse_special_tokens_in_content)

    # ------------------------------------------------------------------------------------------
    # text

    def apply_chat_template(self, messages: Sequence[Any], thinking_mode: str = "auto",
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> str | list[str]:
        """The prompt text of one conversation (a list of conversations gives a list of prompts).
        ``template_kwargs`` are passed to the template next to ``thinking_mode``."""
        check_thinking_mode(thinking_mode)
        conversations, batched = as_conversations(messages)
        prompts = [
            render_chat_template(self.template_source, conv, add_generation_prompt, self.special_tokens,
                                 thinking_mode=thinking_mode, **template_kwargs)
            for conv in conversations
        ]
        return prompts if batched else prompts[0]

    def render_prompt(self, conversation: Sequence[Any], thinking_mode: str = "auto",
                      add_generation_prompt: bool = True, parse_special_tokens_in_content: bool | None = None,
                      **template_kwargs: Any) -> RenderedPrompt:
        """One conversation's prompt text plus its message-content spans (prompt_segments.py). DIVERGES from
        transformers on purpose: special-token text typed in content (``<|im_end|>``, ``<think>``, ``<image>``)
        is tokenized as text (in assistant turns the think tags stay control tokens: the model's own output).
        ``parse_special_tokens_in_content=True`` restores transformers' parsing; None: the processor's setting."""
        check_thinking_mode(thinking_mode)
        parse = self.parse_special_tokens_in_content if parse_special_tokens_in_content is None \
            else parse_special_tokens_in_content
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        return render_prompt(self.template_source, conversation, add_generation_prompt, self.special_tokens, added,
                             assistant_controls=(THINK_START, THINK_END), parse_special_tokens_in_content=parse,
                             thinking_mode=thinking_mode, **template_kwargs)

    def _plain(self):
        self._plain_tokenizer = self._plain_tokenizer or plain_text_tokenizer(self.tokenizer)
        return self._plain_tokenizer

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``. By default the tokenizer's post-processor adds its special tokens unless the
        text already starts with the bos token (transformers' processor rule; Qwen3 adds none)."""
        if add_special_tokens is None:
            add_special_tokens = self._adds_special_tokens(text)
        check_unicode(text, "the text")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _adds_special_tokens(self, text: str) -> bool:
        """The bos rule: the post-processor's special tokens unless ``text`` already starts with bos."""
        bos = self.special_tokens.get("bos_token")
        return not (bos and text.startswith(bos))

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (list or 1-D tensor). ``<think>``/``</think>`` are not special and stay."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in ids]

    # ------------------------------------------------------------------------------------------
    # model inputs

    def __call__(self, text: str | Sequence[str] | None = None, messages: Sequence[Any] | None = None,
                 images: Any = None, thinking_mode: str = "auto", add_generation_prompt: bool = True,
                 parse_special_tokens_in_content: bool | None = None) -> dict:
        """Model inputs for a prompt or a batch (left padded): ``input_ids``, ``attention_mask`` [B, T] int64;
        with images also ``pixel_values``, ``image_sizes``, ``batch_num_images`` (``model(**inputs)`` works).

        ``text``: rendered prompts with literal ``<image>`` placeholders (thinking_mode and
        add_generation_prompt then do nothing). ``messages``: one conversation or a list of them, images
        inside (``{"type": "image", "image" | "url" | "path": ...}``) or via ``images``. ``images``: one list
        per sample, or a flat list (or one image) for a single sample. Message content stays text (see
        ``render_prompt``); a ``text=`` prompt is parsed as it is. Images are held to ``max_image_pixels``.
        """
        check_thinking_mode(thinking_mode)
        if text is not None and messages is not None:
            raise ValueError("pass either text= (rendered prompts) or messages= (conversations), not both.")
        if text is None and messages is None:
            raise ValueError("nothing to process: pass text= or messages=.")
        if messages is not None:
            conversations, _ = as_conversations(messages)
            samples = conversation_images(conversations, images)
            prompts = [self.render_prompt(c, thinking_mode, add_generation_prompt, parse_special_tokens_in_content)
                       for c in conversations]
        else:
            prompts = [text] if isinstance(text, str) else list(text)
            if not prompts:
                raise ValueError("text is an empty list; give at least one prompt.")
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise ValueError(f"text[{i}] should be a string; got {type(p).__name__}.")
                if not p:
                    raise ValueError(f"text[{i}] is an empty string." if len(prompts) > 1
                                     else "text is an empty string.")
            samples = images_per_sample(images, None, len(prompts))
        encoded, out = self.encode_with_images(prompts, samples)
        rows = [e.ids for e in encoded]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, width - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def encode_with_images(self, prompts: Sequence[str | RenderedPrompt], images: Sequence[Sequence[Any]],
                           marks: Sequence[Sequence[int]] | None = None) -> tuple[list[EncodedPrompt], dict]:
        """Tokenize prompts whose ``<image>`` placeholders stand for ``images`` (one list per prompt).

        What ``__call__`` and ``training_data.build_training_example`` share: the number of placeholders
        must equal the number of images; the images are preprocessed together (``pixel_values``,
        ``image_sizes``, ``batch_num_images``: the second value, empty without images); the k-th
        placeholder becomes ``num_image_tokens`` copies of the image token (k-th image's size, multi-image
        when its prompt has several); the text is tokenized with the bos rule of ``encode``; the ids must
        hold exactly the image tokens written. ``marks``: character positions of each prompt to carry
        into the expanded text (``EncodedPrompt.marks``), e.g. where the assistant turns start and end.
        A ``RenderedPrompt`` (``render_prompt``) keeps its content spans as plain text: placeholders and
        control tokens are only the template's; a plain string is parsed whole.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompt(s); give one list per prompt.")
        prompts = [p if isinstance(p, RenderedPrompt) else RenderedPrompt(p) for p in prompts]
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            n = len(placeholder_starts(prompt, self.image_token))
            if n != len(imgs):
                where = f"sample {i}: " if len(prompts) > 1 else ""
                which = "more images than" if len(imgs) > n else "fewer images than"
                raise ValueError(
                    f"{where}the prompt has {n} {self.image_token} placeholder(s) but {len(imgs)} image(s) were "
                    f"given ({which} placeholders); they must match one to one."
                )
        tensors: dict[str, torch.Tensor] = {}
        counts: list[list[int]] = [[] for _ in prompts]
        if any(images):
            tensors = preprocess_images([list(s) for s in images if s], self.image_config,
                                        max_pixels=self.max_image_pixels)
            sizes = iter(tensors["image_sizes"].tolist())
            for i, imgs in enumerate(images):
                counts[i] = [anyres.num_image_tokens(tuple(next(sizes)), self.config, multi_image=len(imgs) > 1)
                             for _ in imgs]
        encoded = []
        for i, (prompt, n_tokens) in enumerate(zip(prompts, counts)):
            check_unicode(prompt.text, f"prompt {i}" if len(prompts) > 1 else "the prompt")
            expanded, moved = expand_placeholders(prompt, self.image_token, n_tokens, marks[i] if marks else ())
            ids, token_starts = encode_prompt(self.tokenizer, self._plain, expanded,
                                              self._adds_special_tokens(expanded.text))
            found = sum(1 for t in ids if t == self.image_token_id)
            if found != sum(n_tokens):
                where = f"sample {i}: " if len(prompts) > 1 else ""
                raise ValueError(
                    f"{where}the tokenized prompt holds {found} image tokens (id {self.image_token_id}) where "
                    f"{sum(n_tokens)} were written; the tokenizer does not keep {self.image_token!r} as one token."
                )
            encoded.append(EncodedPrompt(ids=ids, token_starts=token_starts, marks=moved))
        return encoded, tensors


# ---------------------------------------------------------------------------------------------
# helpers


def _check_image_config(directory: Path, config: R4BConfig, image_config: ImageProcessorConfig) -> None:
    pre, cfg = directory / "preprocessor_config.json", directory / "config.json"
    tile = config.vision_config.image_size
    if image_config.tile_size != tile:
        raise ValueError(
            f"tile size mismatch: {pre} has size {image_config.size} but {cfg} has vision_config.image_size = "
            f"{tile}; images would be cut into tiles the vision tower was not built for."
        )
    ours = [[int(x) for x in p] for p in image_config.image_grid_pinpoints]
    theirs = [[int(x) for x in p] for p in config.image_grid_pinpoints]
    if ours != theirs:
        raise ValueError(
            f"image_grid_pinpoints mismatch: {pre} has {ours} but {cfg} has {theirs}; the processor would give an "
            "image a different number of views and image tokens than the model packs. Make them equal."
        )


def _special_tokens(directory: Path, tokenizer_config: dict) -> dict[str, str]:
    """Template variables for special tokens, as transformers collects them: the named ones
    (bos/eos/unk/sep/pad/cls/mask), any other ``*_token`` string key, and a dict ``extra_special_tokens``.
    special_tokens_map.json is read only when tokenizer_config.json has no added_tokens_decoder (legacy
    checkpoints), and then it wins."""
    merged = dict(tokenizer_config)
    if "added_tokens_decoder" not in tokenizer_config:
        merged.update(read_json_if_present(directory / "special_tokens_map.json") or {})
    out = {}
    for key, value in merged.items():
        text = _token_text(value)
        if text is not None and (key in NAMED_SPECIAL_TOKENS or key.endswith("_token")):
            out[key] = text
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        out.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
    return out
