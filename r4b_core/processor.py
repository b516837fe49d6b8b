"""Prompts and images -> model inputs, and generated ids -> (thinking, answer).

    messages ──chat template (jinja2 sandbox, thinking_mode)──► prompt text with literal <image>
    text ──────────────────────────────────────────────────────► prompt text with literal <image>
    images ──preprocess_images──► pixel_values, image_sizes (h, w after RGB loading), batch_num_images
    each <image> ──► num_image_tokens(image_size, config, multi_image) copies of the image token
    prompt ──tokenizer.json (tokenizers)──► ids ──left padding──► input_ids, attention_mask [B, T]

Everything is read from the checkpoint (DESIGN.md decision 10):
- ``tokenizer.json`` through the ``tokenizers`` library; added tokens from its ``added_tokens`` plus any in
  ``tokenizer_config.json``'s ``added_tokens_decoder`` (they must agree on ids); named special tokens
  (``eos_token``, ``pad_token``, ...) from ``tokenizer_config.json``;
- the image token id from ``config.json``, checked against the tokenizer's id for ``<image>``;
- image settings from ``preprocessor_config.json``, checked against ``config.json`` (tile size and
  pinpoints decide how many tokens an image costs, so a disagreement would break the splice);
- stop ids from ``generation_config.json`` (``eos_token_id``), else the tokenizer's eos token;
- the chat template from ``chat_template.jinja``, else ``chat_template.json``, else
  ``tokenizer_config.json``; ``BUILTIN_CHAT_TEMPLATE`` when the checkpoint has none.

The chat-template machinery (jinja environment, lookup, the built-in template) is in chat_template.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from r4b_core import anyres
from r4b_core.chat_template import (  # noqa: F401  (BUILTIN_CHAT_TEMPLATE, ChatTemplateError: re-exported)
    BUILTIN_CHAT_TEMPLATE,
    ChatTemplateError,
    find_chat_template,
    read_json_object,
    render_chat_template,
)
from r4b_core.config import R4BConfig
from r4b_core.image_processing import ImageProcessorConfig, preprocess_images

THINKING_MODES = ("auto", "long", "short")
IMAGE_TOKEN = "<image>"
THINK_START, THINK_END = "<think>", "</think>"

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES), passed to templates by these names
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---------------------------------------------------------------------------------------------
# output parsing


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a generated text.

    ``<think>T</think>A`` -> (T, A) stripped; ``T</think>A`` (the prompt already ended in ``<think>\\n``,
    long mode) -> (T, A) stripped; ``<think>T`` (thinking not finished) -> (T stripped, "");
    no tags -> (None, text) unchanged. Only the first ``</think>`` after the opening tag closes it.
    """
    start, end = text.find(THINK_START), text.find(THINK_END)
    if start != -1 and (end == -1 or start < end):
        rest = text[start + len(THINK_START):]
        close = rest.find(THINK_END)
        if close == -1:
            return rest.strip(), ""
        return rest[:close].strip(), rest[close + len(THINK_END):].strip()
    if end != -1:
        return text[:end].strip(), text[end + len(THINK_END):].strip()
    return None, text


def check_thinking_mode(thinking_mode: str) -> None:
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


class R4BProcessor:
    """Tokenizer + chat template + image preprocessing for R-4B; see the module docstring."""

    def __init__(self, tokenizer, config: R4BConfig, image_config: ImageProcessorConfig,
                 chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None,
                 eos_token_ids: Sequence[int] | None = None, image_token: str = IMAGE_TOKEN) -> None:
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.config = config
        self.image_config = image_config
        self.chat_template = chat_template  # None: BUILTIN_CHAT_TEMPLATE is used
        self.special_tokens = dict(special_tokens or {})  # template variables: eos_token, pad_token, ...
        self.image_token = image_token
        self.image_token_id = config.image_token_index
        eos_id, pad_id = self.special_token_id("eos_token"), self.special_token_id("pad_token")
        if eos_token_ids is None:
            eos_token_ids = [] if eos_id is None else [eos_id]
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
    def from_pretrained(cls, path_or_repo: str | Path, revision: str | None = None) -> "R4BProcessor":
        """Read the processor from a checkpoint directory or hub id (see the module docstring)."""
        from r4b_weights.hub import resolve_checkpoint

        directory = resolve_checkpoint(path_or_repo, revision)
        config = R4BConfig.from_pretrained(directory)
        image_config = ImageProcessorConfig.from_pretrained(directory)
        _check_image_config(directory, config, image_config)
        tokenizer_config = read_json_object(directory / "tokenizer_config.json") or {}
        tokenizer = load_tokenizer(directory, tokenizer_config)

        special_tokens = _special_tokens(directory, tokenizer_config)
        processor_config = read_json_object(directory / "processor_config.json") or {}
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

        generation = read_json_object(directory / "generation_config.json") or {}
        eos = generation.get("eos_token_id")
        eos_ids = None if eos is None else ([eos] if isinstance(eos, int) else eos)
        if eos_ids is not None and not (isinstance(eos_ids, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_ids)):
            raise ValueError(
                f"{directory / 'generation_config.json'}: eos_token_id = {eos!r} should be an id or a list of ids."
            )
        template, _ = find_chat_template(directory, tokenizer_config)
        return cls(tokenizer, config, image_config, chat_template=template, special_tokens=special_tokens,
                   eos_token_ids=eos_ids, image_token=image_token)

    # ------------------------------------------------------------------------------------------
    # text

    def apply_chat_template(self, messages: Sequence[Any], thinking_mode: str = "auto",
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> str | list[str]:
        """The prompt text of one conversation (a list of conversations gives a list of prompts).
        ``template_kwargs`` are passed to the template next to ``thinking_mode``."""
        check_thinking_mode(thinking_mode)
        conversations, batched = _as_conversations(messages)
        prompts = [
            render_chat_template(self.template_source, conv, add_generation_prompt, self.special_tokens,
                                 thinking_mode=thinking_mode, **template_kwargs)
            for conv in conversations
        ]
        return prompts if batched else prompts[0]

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``. By default the tokenizer's post-processor adds its special tokens unless the
        text already starts with the bos token (transformers' processor rule; Qwen3 adds none)."""
        if add_special_tokens is None:
            bos = self.special_tokens.get("bos_token")
            add_special_tokens = not (bos and text.startswith(bos))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

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
                 images: Any = None, thinking_mode: str = "auto", add_generation_prompt: bool = True) -> dict:
        """Model inputs for a prompt or a batch (left padded): ``input_ids``, ``attention_mask`` [B, T] int64;
        with images also ``pixel_values``, ``image_sizes``, ``batch_num_images`` (``model(**inputs)`` works).

        ``text``: rendered prompts with literal ``<image>`` placeholders (thinking_mode and
        add_generation_prompt then do nothing). ``messages``: one conversation or a list of them, images
        inside (``{"type": "image", "image" | "url" | "path": ...}``) or via ``images``. ``images``: one list
        per sample, or a flat list (or one image) for a single sample.
        """
        check_thinking_mode(thinking_mode)
        if text is not None and messages is not None:
            raise ValueError("pass either text= (rendered prompts) or messages= (conversations), not both.")
        if text is None and messages is None:
            raise ValueError("nothing to process: pass text= or messages=.")
        in_messages = None
        if messages is not None:
            conversations, _ = _as_conversations(messages)
            in_messages = [_images_in_conversation(c) for c in conversations]
            prompts = [self.apply_chat_template(c, thinking_mode, add_generation_prompt) for c in conversations]
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
        samples = _images_per_sample(images, in_messages, len(prompts))

        for i, (prompt, imgs) in enumerate(zip(prompts, samples)):
            n = prompt.count(self.image_token)
            if n != len(imgs):
                where = f"sample {i}: " if len(prompts) > 1 else ""
                raise ValueError(
                    f"{where}the prompt has {n} {self.image_token} placeholder(s) but {len(imgs)} image(s) were given; "
                    "they must match one to one."
                )
        out: dict[str, torch.Tensor] = {}
        counts: list[list[int]] = [[] for _ in samples]
        if any(samples):
            out = preprocess_images([s for s in samples if s], self.image_config)
            sizes = iter(out["image_sizes"].tolist())
            for i, imgs in enumerate(samples):
                counts[i] = [anyres.num_image_tokens(tuple(next(sizes)), self.config, multi_image=len(imgs) > 1)
                             for _ in imgs]
        rows = [self._encode_expanded(p, c) for p, c in zip(prompts, counts)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, width - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def _encode_expanded(self, prompt: str, counts: list[int]) -> list[int]:
        """Token ids of ``prompt`` with its k-th placeholder repeated ``counts[k]`` times."""
        pieces = prompt.split(self.image_token)
        expanded = pieces[0] + "".join(self.image_token * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = self.encode(expanded)
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != sum(counts):
            raise ValueError(
                f"the tokenized prompt holds {found} image tokens (id {self.image_token_id}) where {sum(counts)} "
                f"were written; the tokenizer does not keep {self.image_token!r} as one token."
            )
        return ids

    # ------------------------------------------------------------------------------------------
    # training examples (supervised fine-tuning)

    def build_training_example(self, messages: Sequence[Any], images: Any = None, thinking_mode: str = "auto",
                               max_length: int | None = None) -> dict[str, torch.Tensor]:
        """One supervised example from a conversation that holds at least one assistant turn.

        Returns ``input_ids`` and ``labels`` (int64 [T]) and, with images, ``pixel_values``
        [N_images, views, 3, S, S] and ``image_sizes`` [N_images, 2]; ``collate_training_examples``
        (or ``self.collate``) batches them.

        The text is the chat template's rendering of the whole conversation (no generation prompt).
        ``labels`` are -100 except on what the model should write in each assistant turn: the text
        after the turn's generation prompt (as ``thinking_mode`` renders it: nothing extra for ``auto``,
        so a ``<think>...</think>`` block in the content is learned; ``long`` / ``short`` put the
        ``<think>`` opening / the empty thought in the prompt, so the content must start with it)
        up to and including the turn's end token (``<|im_end|>`` in ChatML, so the model learns to stop;
        the newline after it is not learned: it is never generated). Thinking text is labelled exactly
        as the template renders it. Image tokens are never labels. Tokenization is that of the whole
        text (as at inference); a token is a label when it starts inside a target span.

        Errors: no assistant turn; a number of images that differs from the number of ``<image>``
        placeholders; a template whose rendering of the first turns is not a prefix of the whole
        rendering (turn boundaries could not be found); ``max_length`` exceeded (never truncated).
        """
        check_thinking_mode(thinking_mode)
        conversations, batched = _as_conversations(messages)
        if batched:
            raise ValueError("build_training_example takes one conversation; call it once per conversation.")
        conversation = conversations[0]
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in conversation]
        turns = [i for i, role in enumerate(roles) if role == "assistant"]
        if not turns:
            raise ValueError(
                f"the conversation has no assistant turn (roles: {roles}); a training example needs at least "
                "one assistant message to learn from."
            )
        imgs = _images_per_sample(images, [_images_in_conversation(conversation)], 1)[0]

        def render(msgs: list[Any], generation_prompt: bool) -> str:
            return render_chat_template(self.template_source, msgs, generation_prompt, self.special_tokens,
                                        thinking_mode=thinking_mode)

        full = render(conversation, False)
        spans = []  # character spans [start, end) of the targets in ``full``
        for i in turns:
            head, turn = render(conversation[:i], True), render(conversation[: i + 1], False)
            if not full.startswith(turn):
                raise ValueError(
                    f"the chat template renders messages 0..{i} differently inside the whole conversation (it "
                    "rewrites earlier turns, e.g. drops their thinking), so the assistant turn cannot be located; "
                    "make one training example per assistant turn."
                )
            if not turn.startswith(head):
                raise ValueError(
                    f"assistant message {i} does not start with the generation prompt of thinking_mode="
                    f"{thinking_mode!r} ({head[len(render(conversation[:i], False)):]!r}); write the content as "
                    "the model would continue that prompt, or use thinking_mode='auto'."
                )
            spans.append((len(head), len(turn.rstrip())))

        n_placeholders = full.count(self.image_token)
        if n_placeholders != len(imgs):
            which = "more images than" if len(imgs) > n_placeholders else "fewer images than"
            raise ValueError(
                f"{which} placeholders: the conversation has {n_placeholders} {self.image_token} placeholder(s) "
                f"but {len(imgs)} image(s) were given; they must match one to one."
            )
        out: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if imgs:
            pre = preprocess_images([imgs], self.image_config)
            out = {"pixel_values": pre["pixel_values"], "image_sizes": pre["image_sizes"]}
            counts = [anyres.num_image_tokens(tuple(s), self.config, multi_image=len(imgs) > 1)
                      for s in pre["image_sizes"].tolist()]

        # expand each <image> to its token count, piece by piece, carrying the span boundaries along
        cuts = sorted({0, len(full), *(c for span in spans for c in span)})
        remaining = iter(counts)
        expanded, moved = "", {}
        for a, b in zip(cuts, cuts[1:]):
            moved[a] = len(expanded)
            pieces = full[a:b].split(self.image_token)
            expanded += pieces[0] + "".join(self.image_token * next(remaining) + p for p in pieces[1:])
        moved[len(full)] = len(expanded)
        targets = [(moved[s], moved[e]) for s, e in spans]

        bos = self.special_tokens.get("bos_token")
        encoding = self.tokenizer.encode(expanded, add_special_tokens=not (bos and expanded.startswith(bos)))
        ids = torch.tensor(encoding.ids, dtype=torch.int64)
        if int((ids == self.image_token_id).sum()) != sum(counts):
            raise ValueError(
                f"the tokenized text holds {int((ids == self.image_token_id).sum())} image tokens where "
                f"{sum(counts)} were written; the tokenizer does not keep {self.image_token!r} as one token."
            )
        starts = torch.tensor([start for start, _ in encoding.offsets], dtype=torch.int64)
        is_target = torch.zeros_like(ids, dtype=torch.bool)
        for s, e in targets:
            is_target |= (starts >= s) & (starts < e)
        is_target &= ids != self.image_token_id
        if not bool(is_target.any()):
            raise ValueError("the assistant turns give no target tokens (empty content and no end token).")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"the example has {len(ids)} tokens, more than max_length={max_length}; "
                             "it is not truncated (that could cut image tokens); shorten it or raise the limit.")
        return {"input_ids": ids, "labels": ids.masked_fill(~is_target, IGNORE_INDEX), **out}

    def collate(self, examples: Sequence[Mapping[str, torch.Tensor]],
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """``collate_training_examples`` with this tokenizer's pad id."""
        return collate_training_examples(examples, self.pad_token_id, pad_to_multiple_of)


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
        merged.update(read_json_object(directory / "special_tokens_map.json") or {})
    out = {}
    for key, value in merged.items():
        text = _token_text(value)
        if text is not None and (key in NAMED_SPECIAL_TOKENS or key.endswith("_token")):
            out[key] = text
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        out.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
    return out


def _as_conversations(messages: Any) -> tuple[list[list[Any]], bool]:
    """(conversations, batched) from one conversation or a list of them; empty ones are errors."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages should be a non-empty list of {'role', 'content'} dicts, or a list of such lists.")
    batched = isinstance(messages[0], (list, tuple))
    conversations = [list(c) for c in messages] if batched else [list(messages)]
    for i, conv in enumerate(conversations):
        if not conv:
            raise ValueError(f"conversation {i} is empty; give at least one message." if batched else
                             "the conversation is empty; give at least one message.")
    return conversations, batched


_NO_PAYLOAD = object()


def _images_in_conversation(conversation: list[Any]) -> list[Any]:
    """The images of a conversation's ``{"type": "image"}`` items, in order (``_NO_PAYLOAD`` for an item
    that only marks a place: its image comes from ``images=``)."""
    found = []
    for message in conversation:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind in ("video", "audio"):
                raise ValueError(f"R-4B takes images and text; a '{kind}' content item is not supported.")
            if kind != "image":
                continue
            if "base64" in item:
                raise ValueError("base64 image items are not decoded; pass a PIL image, an array or a file path.")
            payload = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), _NO_PAYLOAD)
            if isinstance(payload, str) and payload.split(":", 1)[0].lower() in ("http", "https", "data"):
                raise ValueError(f"image URLs are not fetched ({payload[:60]!r}); download it and pass the file path.")
            found.append(payload)
    return found


def _images_per_sample(images: Any, in_messages: list[list[Any]] | None, batch: int) -> list[list[Any]]:
    """One list of images per sample, from the messages or from ``images=`` (never both)."""
    if in_messages is not None and any(x is not _NO_PAYLOAD for s in in_messages for x in s):
        if images is not None:
            raise ValueError("images are given both inside the messages and as images=; give them one way.")
        if any(x is _NO_PAYLOAD for s in in_messages for x in s):
            raise ValueError("some image items carry an image ('image', 'url' or 'path') and some do not.")
        return [list(s) for s in in_messages]
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return [[] for _ in range(batch)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    nested = [x is None or isinstance(x, (list, tuple)) for x in images]
    if images and all(nested):
        if len(images) != batch:
            raise ValueError(f"images has {len(images)} per-sample lists for {batch} prompt(s).")
        return [list(x or []) for x in images]
    if any(nested):
        raise ValueError(
            "images mixes lists and single images; give one list per sample, or a flat list for one sample."
        )
    if batch != 1:
        raise ValueError(f"with {batch} prompts, give images as one list per prompt (e.g. [[img], []]).")
    return [list(images)]


# ---------------------------------------------------------------------------------------------
# batching training examples

IGNORE_INDEX = -100


def collate_training_examples(examples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int,
                              pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """A training batch from ``build_training_example`` outputs; ``model(**batch)`` works.

    ``input_ids`` [B, T] RIGHT-padded with ``pad_token_id`` (training: every real token keeps positions
    0..n-1), ``attention_mask`` [B, T] (1 = real), ``labels`` [B, T] padded with -100; with images,
    ``pixel_values`` [N, max_views, 3, S, S] (all images of the batch in order, views zero-padded),
    ``image_sizes`` [N, 2] and ``batch_num_images`` [B] (images per example, 0 for a text-only one;
    the model tiles an image only when its example has exactly one).
    """
    if not examples:
        raise ValueError("collate_training_examples: no examples.")
    for i, ex in enumerate(examples):
        if ex["input_ids"].ndim != 1 or ex["labels"].shape != ex["input_ids"].shape:
            raise ValueError(f"example {i}: input_ids and labels should be 1-D tensors of one length.")
        if ("pixel_values" in ex) != ("image_sizes" in ex):
            raise ValueError(f"example {i}: pixel_values and image_sizes come together.")
    width = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.int64)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((batch, width), dtype=torch.int64)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = ex["input_ids"], ex["labels"], 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with_images = [ex for ex in examples if "pixel_values" in ex]
    if with_images:
        views = max(ex["pixel_values"].shape[1] for ex in with_images)
        out["pixel_values"] = torch.cat([
            torch.nn.functional.pad(ex["pixel_values"], (0, 0, 0, 0, 0, 0, 0, views - ex["pixel_values"].shape[1]))
            for ex in with_images
        ])
        out["image_sizes"] = torch.cat([ex["image_sizes"] for ex in with_images])
        out["batch_num_images"] = torch.tensor([len(ex.get("image_sizes", ())) for ex in examples], dtype=torch.int64)
    return out
