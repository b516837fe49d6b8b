"""Chat templates: transformers' rendering environment, lookup in the checkpoint, and the built-in template.

Templates render as transformers 5.24 renders them (``utils/chat_template_utils.py``): an
``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks``, the loop-controls extension
and a ``{% generation %}`` block; globals ``raise_exception``, ``strftime_now``, a plain ``dict`` and an
underscore-refusing ``namespace``; a ``tojson`` filter that is ``json.dumps`` (``ensure_ascii=False``, no
HTML escaping, ``indent`` / ``separators`` / ``sort_keys`` options). The template sees ``messages`` (keys
whose value is None dropped, everything rebuilt from plain JSON types: images become placeholder
strings such as ``"<Image>"``, reasoning copied to ``reasoning_content`` / ``thinking``),
``add_generation_prompt``, ``tools=None``, ``documents=None``, the named special tokens and every extra
keyword (``thinking_mode`` here); keywords override special tokens of the same name.

Built-in chat template (``BUILTIN_CHAT_TEMPLATE``), used only when the checkpoint ships none. R-4B's own
template text is not public (shared/reference/r4b_spec.md §3.2), so all of it is INFERRED:
- each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (Qwen3 ChatML); no default system prompt;
- string content is written as is; list content item by item, in order, with nothing in between: a
  text item as its text, an image item as ``<image>\\n`` (the placeholder plus one newline, the way
  VLMEvalKit writes ``"<image>\\n"`` before the question); any other item type raises;
- earlier assistant turns are written verbatim (their ``<think>`` blocks are not stripped);
- the generation prompt is ``<|im_start|>assistant\\n`` followed by nothing for ``auto`` (the model
  decides whether to think), ``<think>\\n`` for ``long`` (forces thinking) and ``<think>\\n\\n</think>\\n\\n``
  for ``short`` (an empty thought), modelled on Qwen3's ``enable_thinking`` switch (its
  ``enable_thinking=False`` string), not confirmed for R-4B;
- an unknown ``thinking_mode`` raises through ``raise_exception`` (and the processor checks it first).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from r4b_core.json_io import read_json_if_present

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

BUILTIN_CHAT_TEMPLATE = r"""{#- r4b built-in: Qwen3 ChatML + R-4B's thinking modes (inferred, see processor.py) -#}
{%- set mode = thinking_mode if thinking_mode is defined and thinking_mode is not none else "auto" -%}
{%- if mode not in ["auto", "long", "short"] -%}
    {{- raise_exception("thinking_mode must be one of 'auto', 'long', 'short'; got '" ~ mode ~ "'.") -}}
{%- endif -%}
{%- for message in messages -%}
    {{- "<|im_start|>" ~ message["role"] ~ "\n" -}}
    {%- if message["content"] is string -%}
        {{- message["content"] -}}
    {%- else -%}
        {%- for item in message["content"] -%}
            {%- if item["type"] == "image" -%}
                {{- "<image>\n" -}}
            {%- elif item["type"] == "text" -%}
                {{- item["text"] -}}
            {%- else -%}
                {{- raise_exception("content items must have type 'image' or 'text'; got '" ~ item["type"] ~ "'.") -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
    {%- if mode == "long" -%}
        {{- "<think>\n" -}}
    {%- elif mode == "short" -%}
        {{- "<think>\n\n</think>\n\n" -}}
    {%- endif -%}
{%- endif -%}
"""
class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that called ``raise_exception``."""



# ---------------------------------------------------------------------------------------------
# the jinja environment (transformers' settings, written out here)


@lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """A compiled template in transformers' chat-template environment (cached per template text)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        raise ImportError(f"jinja2 >= 3.1.6 is needed to render chat templates safely; found {jinja2.__version__}.")

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it to mark
        assistant tokens; the marks are not needed here)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class PlainDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - jinja's own signature trick, so namespace(self=...) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r}).")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = PlainDict()
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def plain_template_data(value: Any) -> Any:
    """What a template may see: JSON types rebuilt from scratch; anything else (an image, an array)
    becomes the placeholder string ``"<TypeName>"`` (transformers' ``_plain_template_data``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) lose their extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(conversation: Sequence[Any]) -> list[dict]:
    """transformers' message preparation: dicts only, None-valued keys dropped, plain data, reasoning aliases."""
    out = []
    for message in conversation:
        if not isinstance(message, Mapping):
            raise ValueError(f"each message should be a dict with 'role' and 'content'; got {message!r}.")
        message = plain_template_data({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(source: str, conversation: Sequence[Any], add_generation_prompt: bool,
                         special_tokens: Mapping[str, str], **kwargs: Any) -> str:
    """Render one conversation; ``kwargs`` (e.g. thinking_mode) override special tokens of the same name."""
    import jinja2

    template = compile_chat_template(source)
    reserved = sorted({"messages", "add_generation_prompt"} & kwargs.keys())
    if reserved:
        raise ValueError(f"template variable(s) {reserved} are set from the arguments; do not pass them as extras.")
    variables = plain_template_data({"tools": None, "documents": None, **special_tokens, **kwargs})
    messages = _template_messages(conversation)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e
    except Exception as e:  # the template's own code failed on these messages (e.g. iterating an int content)
        raise ChatTemplateError(
            f"chat template: rendering failed ({type(e).__name__}: {e}); check the messages: 'content' should be "
            "a string or a list of {'type': 'text' | 'image', ...} parts.") from e


# ---------------------------------------------------------------------------------------------
# finding the checkpoint's template


def _pick_template(value: Any, source: Path) -> str:
    """A template string, or the "default" entry of a list of {"name", "template"} (or a name->text dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value):
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, Mapping):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise ValueError(f"{source}: several chat templates ({sorted(value)}) and none named 'default'.")
    raise ValueError(
        f"{source}: 'chat_template' should be a string or a list of named templates; got {type(value).__name__}."
    )


def find_chat_template(directory: Path, tokenizer_config: dict | None = None) -> tuple[str | None, Path | None]:
    """(template text, file it came from): chat_template.jinja, then chat_template.json, then
    tokenizer_config.json; (None, None) when the checkpoint has none."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    json_file = directory / "chat_template.json"
    d = read_json_if_present(json_file)
    if d is not None and d.get("chat_template") is not None:
        return _pick_template(d["chat_template"], json_file), json_file
    config_file = directory / "tokenizer_config.json"
    if tokenizer_config is None:
        tokenizer_config = read_json_if_present(config_file) or {}
    if tokenizer_config.get("chat_template") is not None:
        return _pick_template(tokenizer_config["chat_template"], config_file), config_file
    return None, None


