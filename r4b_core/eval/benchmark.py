"""Local benchmark files -> ``EvalItem`` lists; nothing is downloaded.

Two layouts, told apart by the file name (``.tsv`` / ``.jsonl``):

- VLMEvalKit's TSV for multiple-choice benchmarks (MMBench, MMStar, ...): a header row, then one row per
  question. Columns ``index`` (the id), ``question``, option columns ``A``, ``B``, ... (an empty cell: no
  such option), ``answer`` (a letter), optional ``hint``, ``category``, ``answer_type``, and either
  ``image`` (base64 bytes, a JSON list of them, or, as VLMEvalKit does for repeated pictures, the
  ``index`` of an earlier row whose image it shares) or ``image_path`` (a path or a JSON list, relative
  to the TSV's folder). Without option columns an item's ``answer_type`` defaults to ``text``.
- JSON Lines for open questions: one object per line with ``question``, ``answer``, ``answer_type``
  (``choice`` | ``number`` | ``math`` | ``text``; default ``choice`` with options, else ``text``), and
  optional ``id``, ``image`` (a path or a list, relative to the file's folder), ``options`` (a list or a
  ``{"A": ..}`` object), ``hint``, ``category``.

A bad file raises ``BenchmarkFileError`` (a ValueError) naming the file, the row and the column.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from r4b_core.scoring import ANSWER_TYPES


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read; the message names the file, row and column."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question. ``images``: encoded image bytes (TSV base64) or file paths, in order."""

    id: str
    question: str
    answer: str
    answer_type: str
    options: dict[str, str] | None = None
    hint: str | None = None
    category: str | None = None
    images: tuple[bytes | Path, ...] = field(default=(), repr=False)


def load_benchmark(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The items of a ``.tsv`` (VLMEvalKit) or ``.jsonl`` benchmark file, in file order (at most ``limit``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        shown = repr(str(path)) if str(path) != str(path).strip() else path  # a stray space is visible when quoted
        raise FileNotFoundError(f"{shown}: no such benchmark file (give a VLMEvalKit .tsv or a .jsonl file).")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        items = _read_tsv(path)
    elif suffix in (".jsonl", ".json"):
        items = _read_jsonl(path)
    else:
        raise BenchmarkFileError(f"{path}: unknown benchmark layout {suffix!r}; r4b eval reads VLMEvalKit .tsv files "
                                 "and .jsonl files.")
    if not items:
        raise BenchmarkFileError(f"{path}: holds no questions.")
    return items[:limit] if limit is not None else items


def _fail(path: Path, row: int, column: str | None, problem: str) -> BenchmarkFileError:
    where = f"{path}: row {row}" + (f", column {column!r}" if column else "")
    return BenchmarkFileError(f"{where}: {problem}")


def _check_answer_type(path: Path, row: int, value: str) -> str:
    if value not in ANSWER_TYPES:
        raise _fail(path, row, "answer_type", f"{value!r} is not one of {', '.join(ANSWER_TYPES)}.")
    return value


def _decode_base64(path: Path, row: int, text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _fail(path, row, "image", "not valid base64 (VLMEvalKit stores each image base64-encoded; a JSON "
                                        "list of such strings for several).") from None


def _json_list_or_one(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            # VLMEvalKit sometimes writes Python reprs of lists: ['a', 'b']
            value = json.loads(text.replace("'", '"'))
        return [str(v) for v in value]
    return [text] if text else []


def _image_file(path: Path, row: int, column: str, name: str) -> Path:
    image = (path.parent / name).expanduser()
    if not image.is_file():
        raise _fail(path, row, column, f"image file {name!r} not found (paths are relative to {path.parent}).")
    return image


def _read_tsv(path: Path) -> list[EvalItem]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default 128 KiB field limit
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise BenchmarkFileError(f"{path}: empty file (a VLMEvalKit TSV starts with a header row).")
    header = [h.strip() for h in rows[0]]
    for required in ("index", "question", "answer"):
        if required not in header:
            raise BenchmarkFileError(f"{path}: the header has no {required!r} column (it has {', '.join(header)}); "
                                     "VLMEvalKit TSVs have index, question, A, B, ..., answer, image.")
    letters = [h for h in header if len(h) == 1 and h in string.ascii_uppercase]
    items, images_by_index = [], {}
    for number, cells in enumerate(rows[1:], start=1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise _fail(path, number, None, f"has {len(cells)} cells but the header has {len(header)} columns "
                                            "(a tab inside a cell must be quoted).")
        row = dict(zip(header, cells))
        index = row["index"].strip()
        if not index:
            raise _fail(path, number, "index", "empty; every row needs an id.")
        if not row["question"].strip():
            raise _fail(path, number, "question", "empty.")
        options = {k: row[k].strip() for k in letters if row[k].strip() and row[k].strip().lower() != "nan"}
        answer_type = _check_answer_type(path, number, row.get("answer_type", "").strip() or
                                         ("choice" if options else "text"))
        if answer_type == "choice" and not options:
            raise _fail(path, number, "A", "a multiple-choice row without any option column filled.")
        images: list[bytes | Path] = []
        if row.get("image", "").strip():
            value = row["image"].strip()
            if len(value) <= 64 and value in images_by_index:
                images = list(images_by_index[value])  # VLMEvalKit: a short cell names the row holding the image
            else:
                images = [_decode_base64(path, number, v) for v in _json_list_or_one(value)]
        elif row.get("image_path", "").strip():
            try:
                names = _json_list_or_one(row["image_path"])
            except ValueError:
                raise _fail(path, number, "image_path", "not a path or a JSON list of paths.") from None
            images = [_image_file(path, number, "image_path", n) for n in names]
        images_by_index[index] = tuple(images)
        hint = row.get("hint", "").strip()
        items.append(EvalItem(id=index, question=row["question"].strip(), answer=row["answer"].strip(),
                              answer_type=answer_type, options=options or None,
                              hint=hint if hint and hint.lower() != "nan" else None,
                              category=row.get("category", "").strip() or None, images=tuple(images)))
    _check_unique(path, items)
    return items


def _read_jsonl(path: Path) -> list[EvalItem]:
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise _fail(path, number, None, f"not valid JSON ({e}).") from None
            if not isinstance(record, dict):
                raise _fail(path, number, None, "expected a JSON object per line.")
            items.append(_jsonl_item(path, number, record))
    _check_unique(path, items)
    return items


def _jsonl_item(path: Path, number: int, record: dict) -> EvalItem:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _fail(path, number, "question", "missing or not a non-empty string.")
    if "answer" not in record or isinstance(record["answer"], (dict, list)) or record["answer"] is None:
        raise _fail(path, number, "answer", "missing, or not a string / number.")
    options = record.get("options")
    if isinstance(options, list):
        options = {string.ascii_uppercase[i]: str(v) for i, v in enumerate(options)}
    if options is not None and (not isinstance(options, dict) or not options):
        raise _fail(path, number, "options", "expected a non-empty list or {\"A\": ...} object.")
    answer_type = record.get("answer_type") or ("choice" if options else "text")
    if not isinstance(answer_type, str):
        raise _fail(path, number, "answer_type", f"expected a string, got {answer_type!r}.")
    _check_answer_type(path, number, answer_type)
    images = record.get("image", record.get("images", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise _fail(path, number, "image", "expected a path or a list of paths.")
    category, hint = record.get("category"), record.get("hint")
    return EvalItem(id=str(record.get("id", record.get("index", number))), question=question.strip(),
                    answer=str(record["answer"]).strip(), answer_type=answer_type,
                    options={str(k): str(v) for k, v in options.items()} if options else None,
                    hint=str(hint) if hint else None, category=str(category) if category is not None else None,
                    images=tuple(_image_file(path, number, "image", i) for i in images))


def _check_unique(path: Path, items: list[EvalItem]) -> None:
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        if item.id in seen:
            raise _fail(path, number, "id", f"id {item.id!r} repeats row {seen[item.id]}; ids must be unique "
                                           "(predictions are keyed by them).")
        seen[item.id] = number


def open_item_images(item: EvalItem, max_pixels: int | None = None) -> list:
    """The item's images as RGB PIL images (decoded by image_processing.load_image under ``max_pixels``)."""
    from r4b_core.processing.image_processing import load_image

    limit = {} if max_pixels is None else {"max_pixels": max_pixels}  # None: PIL's limit
    return [load_image(image, **limit) if isinstance(image, Path) else
            load_image(image, name=f"item {item.id}'s image", **limit) for image in item.images]


def image_bytes(image: bytes | Path) -> bytes:
    """The encoded bytes of one item image (for a data: URI)."""
    return image.read_bytes() if isinstance(image, Path) else image


__all__ = ["BenchmarkFileError", "EvalItem", "image_bytes", "load_benchmark", "open_item_images"]
