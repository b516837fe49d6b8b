"""JSON in and out for a checkpoint's files: reading a JSON object file with errors that name it, and
the walk between a dataclass's fields and the keys of a JSON object.

``read_json`` (config.json, preprocessor_config.json, generation_config.json, tokenizer and
chat-template files, the safetensors shard index): every failure names the path and what is wrong:

- no such file                      -> ``FileNotFoundError``;
- bytes that are not UTF-8          -> the caller's error class (a ``ValueError``), with the byte offset;
- text that is not JSON             -> the same, with line and column;
- a top level that is not an object -> the same, with the type found.

The caller picks the error class (``error=``) so that, e.g., config.json failures stay ``ConfigError``
and a broken shard index stays a ``CorruptCheckpointError``.

``read_fields`` / ``write_fields``: a dataclass whose field names are the JSON keys is read by walking
its fields, so each default is written once, in the field. An absent or null key takes the default,
a field without a default is a required key, and every value is checked against the field's annotation
(int, float, str, bool, dict, list[X] and unions of them; an int is accepted where a float is
expected, a bool never counts as a number). Fields whose metadata is ``MANUAL`` are left to the
class's own code; ``OMIT_NONE`` fields are written back only when set.

This module sits at the config layer and imports nothing from r4b.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import types
import typing
from pathlib import Path
from typing import Any

MANUAL = {"manual": True}  # field metadata: not walked by read_fields / write_fields
OMIT_NONE = {"omit_none": True}  # field metadata: written back only when not None


class JSONFileError(ValueError):
    """A JSON file that cannot be used: not UTF-8, not JSON, or not a JSON object at the top level."""


def read_json(path: str | Path, *, what: str = "JSON file", error: type[ValueError] = JSONFileError) -> dict:
    """The JSON object in ``path``; ``what`` (e.g. "the model config") is said when the file is missing.

    Raises ``FileNotFoundError`` when there is no file, else ``error`` (a ``ValueError`` subclass) for
    invalid UTF-8, invalid JSON or a top level that is not an object; each message starts with the path.
    """
    path = Path(path)
    if not path.is_file():
        detail = "is a directory, not a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {detail} ({what} was expected here).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); {what} must be UTF-8 encoded JSON."
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object at the top level; got {_json_type(value)}.")
    return value


def read_json_if_present(
    path: str | Path, *, what: str = "JSON file", error: type[ValueError] = JSONFileError
) -> dict | None:
    """``read_json(path)``, or None when there is no file at ``path`` (for optional checkpoint files)."""
    if not Path(path).exists():
        return None
    return read_json(path, what=what, error=error)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages: "an array", "a string", "a boolean", ..."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


# ---------------------------------------------------------------------------------------------
# dataclass fields <-> JSON keys


def is_int(x: Any) -> bool:
    """Whether ``x`` is an integer (Python or numpy), not a bool: the one integer check of config, JSON and
    request values (``True`` is an int to Python, never a count or an id to r4b)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """Whether ``x`` is a real number (int or float, Python or numpy), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def matches_annotation(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (int, float, str, bool, dict, list[X], unions)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_annotation(value, h) for h in args)
    if origin is list:
        return isinstance(value, list) and all(matches_annotation(x, args[0]) for x in value if args)
    if hint in (int, float):
        return is_int(value) or (hint is float and isinstance(value, float))
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    """'int', 'float', 'int or list[int]' (None left out: null always means "absent")."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    return hint.__name__ if isinstance(hint, type) else str(hint)


def read_fields(cls: type, d: dict, where: str = "", *, error: type[ValueError] = JSONFileError) -> dict[str, Any]:
    """Pop the key of every field of dataclass ``cls`` (but ``MANUAL`` ones) from ``d`` and return the
    type-checked values as constructor kwargs. Absent or null keys are left out, so that the field's
    default applies; ``error`` is raised for a missing required key or a value of the wrong type.
    ``where`` prefixes the key in messages ("" or "text_config.")."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("manual"):
            continue
        value, hint = d.pop(f.name, None), hints[f.name]
        if value is not None and not matches_annotation(value, hint):
            raise error(f"key '{where}{f.name}' = {value!r} should be of type {_type_name(hint)}.")
        if value is not None:
            kwargs[f.name] = float(value) if hint is float else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"required key '{where}{f.name}' is missing.")
    return kwargs


def write_fields(obj: Any) -> dict[str, Any]:
    """The fields of dataclass instance ``obj`` as JSON keys (deep copies), but ``MANUAL`` fields and
    ``OMIT_NONE`` fields that are None."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.metadata.get("manual") and not (value is None and f.metadata.get("omit_none")):
            out[f.name] = copy.deepcopy(value)
    return out
