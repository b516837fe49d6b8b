"""Fuzzing (hypothesis) for crashes: whatever the input, r4b either works or raises its own error.

"Its own error": a ``ValueError`` (r4b's classes are subclasses: ``ConfigError``, ``CheckpointError``,
``ChatTemplateError``, ...) or ``FileNotFoundError``, raised from r4b's code (the innermost frame is in
``r4b_core`` / ``r4b_weights``, or the class is r4b's) and with a message; never a raw ``TypeError``,
``KeyError``, ``AttributeError``, ``IndexError``, a ``UnicodeError`` or a ``ValueError`` thrown from
inside a library, and never a hang (every example runs under a hard time limit, and hypothesis'
deadline). Targets:

- the tiny_processor on random conversations: roles, text and image parts, odd Unicode (lone surrogates,
  control and bidi characters), special-token text, empty parts, payloads that are not images;
- the chat-template variables: thinking_mode, add_generation_prompt, message shapes;
- anyres on random (also invalid) image sizes, pinpoint lists and tile sizes; when valid, the token
  count equals the packed feature count;
- ``from_pretrained`` on a copy of the tiny checkpoint whose safetensors header bytes are flipped,
  rewritten or truncated, and whose config.json values are replaced (wrong types, negatives, huge
  values, missing keys).

Example counts are small so the default suite stays fast; the ``slow`` variants run many more.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import signal
import struct
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from r4b_core.models import anyres
from r4b_core.config import R4BConfig, preset
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor

HARD_LIMIT_S = 60  # a hang: far beyond any example's work (milliseconds to a second)
DEADLINE = timedelta(seconds=20)  # generous: the CPU is shared


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=DEADLINE, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


FAST, SLOW = 25, 400


# ---------------------------------------------------------------------------------------------
# the property: only r4b's own errors


@contextlib.contextmanager
def time_limit(seconds: int):
    """A hard limit (SIGALRM): a hang fails the example instead of stalling the suite."""
    if not hasattr(signal, "SIGALRM"):  # not on Windows: hypothesis' deadline still reports slow examples
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _raised_in_r4b(e: BaseException) -> bool:
    if type(e).__module__.split(".")[0] in ("r4b_core", "r4b_weights"):
        return True
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    name = Path(last.tb_frame.f_code.co_filename).parts if last else ()
    return "r4b_core" in name or "r4b_weights" in name


def r4b_result(fn, *args, **kwargs):
    """``fn(...)``'s result, or the r4b error it raised; any other exception fails the test."""
    try:
        with time_limit(HARD_LIMIT_S):
            return fn(*args, **kwargs)
    except UnicodeError as e:  # a ValueError subclass, but a raw one from a codec
        raise AssertionError(f"a raw {type(e).__name__} escaped: {e}") from e
    except (ValueError, FileNotFoundError) as e:
        if not _raised_in_r4b(e):
            raise AssertionError(f"a {type(e).__name__} from outside r4b escaped unexplained: {e}") from e
        assert str(e).strip(), f"{type(e).__name__} without a message"
        what = re.sub(r"/\S+", "<path>", str(e))[:60]  # (paths differ from run to run)
        event(f"{getattr(fn, '__name__', type(fn).__name__)}: {type(e).__name__}: {what}")  # --hypothesis-show-statistics
        return e


# ---------------------------------------------------------------------------------------------
# strategies

SPECIAL_TEXT = ["<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>",
                "<|vision_start|>", "{{ messages }}", "{% if %}", "\x00", "\ufeff", "\u202e", "\ud800",
                "\udfff", "🙂", "e\u0301", "\r\n", "\t", " ", ""]
odd_text = st.lists(st.one_of(st.sampled_from(SPECIAL_TEXT),
                              st.text(st.characters(exclude_categories=()), max_size=12)),
                    max_size=5).map("".join)


@st.composite
def small_images(draw):
    h, w = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16", "1"]))
    return Image.new(mode, (w, h))


bad_payloads = st.sampled_from([None, 3, 2.5, "no/such/file.png", "http://example.com/x.png", b"\x89PNG",
                                np.zeros((4, 4), dtype=np.float32), np.zeros((0, 3, 3), dtype=np.uint8),
                                np.zeros((5, 6, 3), dtype=np.uint8), {"x": 1}, [1, 2]])
payloads = st.one_of(small_images(), bad_payloads)

text_parts = st.builds(lambda t: {"type": "text", "text": t}, odd_text)
image_marks = st.just({"type": "image"})
image_items = st.builds(lambda p, key: {"type": "image", key: p}, payloads, st.sampled_from(["image", "url", "path"]))
odd_parts = st.sampled_from([{}, {"type": "video"}, {"type": 3}, {"type": "text"}, {"type": "text", "text": None},
                             {"type": "text", "text": 5}, "a bare string", None, 7, {"type": "image", "base64": "AA=="}])
contents = st.one_of(odd_text, st.none(), st.integers(),
                     st.lists(st.one_of(text_parts, image_marks, image_items, odd_parts), max_size=4))
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), odd_text, st.none(), st.integers())
messages = st.builds(lambda r, c: {"role": r, "content": c}, roles, contents)
odd_messages = st.one_of(messages, st.sampled_from([{}, {"role": "user"}, {"content": "hi"}, "hi", None, 3, []]))
wild_conversations = st.lists(st.one_of(messages, odd_messages), max_size=4)


@st.composite
def fitting_conversations(draw):
    """Well-formed conversations with as many images as image parts (so the deep paths run), as
    (messages, images); the text is still odd."""
    conversation, n_images = [], 0
    for _ in range(draw(st.integers(1, 3))):
        role = draw(st.sampled_from(["system", "user", "assistant"]))
        if draw(st.booleans()):
            content = draw(odd_text)
        else:
            content = draw(st.lists(st.one_of(text_parts, image_marks), max_size=3))
            n_images += sum(part["type"] == "image" for part in content)
        conversation.append({"role": role, "content": content})
    images = [draw(small_images()) for _ in range(n_images)]
    return conversation, images if images or draw(st.booleans()) else None


cases = st.one_of(fitting_conversations(), st.tuples(wild_conversations,
                                                    st.one_of(st.none(), st.lists(payloads, max_size=2))))
conversations = st.one_of(wild_conversations, fitting_conversations().map(lambda c: c[0]))
thinking_modes = st.sampled_from(["auto", "long", "short"] * 3 + ["", "LONG", "none", None, 1])
generation_flags = st.one_of(st.booleans(), st.sampled_from([None, 0, 1, "yes", [True]]))


# ---------------------------------------------------------------------------------------------
# tiny_processor and chat template


def check_processor(tiny_processor, conversation, images, thinking_mode, add_generation_prompt):
    out = r4b_result(tiny_processor, messages=conversation, images=images, thinking_mode=thinking_mode,
                     add_generation_prompt=add_generation_prompt)
    if isinstance(out, Exception):
        return
    event("processor: ok" + (" with images" if "image_sizes" in out else ""))
    ids = out["input_ids"]
    assert ids.dtype == torch.int64 and ids.ndim == 2 and ids.shape[1] > 0
    n_image_tokens = int((ids == tiny_processor.image_token_id).sum())
    if "image_sizes" not in out:
        assert n_image_tokens == 0
        return
    # the model's splice needs exactly this: the tokens written equal what the images pack into
    multi = len(out["image_sizes"]) > 1
    sizes = [tuple(s) for s in out["image_sizes"].tolist()]
    assert n_image_tokens == sum(anyres.num_image_tokens(s, tiny_processor.config, multi_image=multi) for s in sizes)


@fuzz_settings(FAST * 3)
@given(case=cases, thinking_mode=thinking_modes, add_generation_prompt=generation_flags)
def test_processor_on_random_conversations(tiny_processor, case, thinking_mode, add_generation_prompt):
    check_processor(tiny_processor, *case, thinking_mode, add_generation_prompt)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(case=cases, thinking_mode=thinking_modes, add_generation_prompt=generation_flags)
def test_processor_on_random_conversations_long(tiny_processor, case, thinking_mode, add_generation_prompt):
    check_processor(tiny_processor, *case, thinking_mode, add_generation_prompt)


def check_template(tiny_processor, shaped, thinking_mode, add_generation_prompt, extra):
    out = r4b_result(tiny_processor.apply_chat_template, shaped, thinking_mode=thinking_mode,
                     add_generation_prompt=add_generation_prompt, **extra)
    if isinstance(out, Exception):
        return
    assert isinstance(out, str) or (isinstance(out, list) and all(isinstance(p, str) for p in out))


template_shapes = st.one_of(conversations, st.lists(conversations, max_size=3), st.none(), odd_text,
                            st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
template_extras = st.dictionaries(st.sampled_from(["enable_thinking", "tools", "bos_token", "eos_token", "custom"]),
                                  st.one_of(st.none(), st.booleans(), odd_text, st.integers()), max_size=2)


@fuzz_settings(FAST * 4)
@given(shaped=template_shapes, thinking_mode=thinking_modes, add_generation_prompt=generation_flags,
       extra=template_extras)
def test_chat_template_variables_and_message_shapes(tiny_processor, shaped, thinking_mode, add_generation_prompt, extra):
    check_template(tiny_processor, shaped, thinking_mode, add_generation_prompt, extra)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(shaped=template_shapes, thinking_mode=thinking_modes, add_generation_prompt=generation_flags,
       extra=template_extras)
def test_chat_template_variables_and_message_shapes_long(tiny_processor, shaped, thinking_mode, add_generation_prompt,
                                                         extra):
    check_template(tiny_processor, shaped, thinking_mode, add_generation_prompt, extra)


# ---------------------------------------------------------------------------------------------
# anyres


size_values = st.one_of(st.integers(1, 3000), st.integers(-3, 0), st.sampled_from([2.5, "7", None, 10**9]))
sizes = st.one_of(st.tuples(size_values, size_values), st.sampled_from([(), (3,), (1, 2, 3), "ab", None, 5]))
pin_values = st.one_of(st.integers(1, 8).map(lambda k: k * 28), st.integers(-30, 200), st.sampled_from([0, 2.0, "56", None, True]))
pinpoint_lists = st.one_of(st.lists(st.lists(pin_values, min_size=2, max_size=2), min_size=1, max_size=5),
                           st.lists(st.lists(pin_values, max_size=3), max_size=3), st.sampled_from([None, "x", 3]))
tile_sizes = st.one_of(st.sampled_from([28, 56]), st.sampled_from([0, -28, 28.0, None, "28", True]))


@st.composite
def valid_anyres_inputs(draw):
    """A valid (size, pinpoints, tile): the count-equals-packed property is checked on these."""
    tile = draw(st.sampled_from([28, 56]))
    pins = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6))
    size = (draw(st.integers(1, 6000)), draw(st.integers(1, 6000)))
    return size, [[tile * a, tile * b] for a, b in pins], tile


anyres_inputs = st.one_of(valid_anyres_inputs(), st.tuples(sizes, pinpoint_lists, tile_sizes))


def check_anyres(size, pins, tile, ratio):
    rows_cols = r4b_result(anyres.grid_shape, size, pins, tile)
    if isinstance(rows_cols, Exception):
        return
    rows, cols = rows_cols
    patch = 14
    cfg = dataclass_config(tile, patch, pins, ratio)
    count = r4b_result(anyres.num_image_tokens, size, cfg)
    if isinstance(count, Exception):
        return
    side = tile // patch
    views = torch.randn(1 + rows * cols, side * side, 2)
    packed = anyres.pack_image_features(views, size, torch.randn(2), pins, tile, side, ratio)
    assert packed.shape[0] == count
    event("anyres: count == packed rows")


def dataclass_config(tile: int, patch: int, pins, ratio: str) -> R4BConfig:
    import dataclasses

    base = preset("tiny")
    vision = dataclasses.replace(base.vision_config, image_size=tile, patch_size=patch)
    return R4BConfig(text_config=base.text_config, vision_config=vision, image_token_index=base.image_token_index,
                     image_grid_pinpoints=pins, vision_aspect_ratio=ratio)


ratios = st.sampled_from(["anyres", "anyres_max_1", "anyres_max_9"])


@fuzz_settings(FAST * 8)
@given(inputs=anyres_inputs, ratio=ratios)
def test_anyres_on_random_sizes_pinpoints_and_tiles(inputs, ratio):
    check_anyres(*inputs, ratio)


@pytest.mark.slow
@fuzz_settings(SLOW * 5)
@given(inputs=anyres_inputs, ratio=ratios)
def test_anyres_on_random_sizes_pinpoints_and_tiles_long(inputs, ratio):
    check_anyres(*inputs, ratio)


# ---------------------------------------------------------------------------------------------
# checkpoints: safetensors header bytes, config.json values


@pytest.fixture(scope="module")
def checkpoint_copy(tiny_checkpoint, tmp_path_factory) -> tuple[Path, bytes, dict]:
    """(a private copy of the tiny checkpoint, its model.safetensors bytes, its config.json) to mutate."""
    directory = Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("fuzz") / "ckpt"))
    return directory, (directory / "model.safetensors").read_bytes(), json.loads((directory / "config.json").read_text())


def header_span(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@st.composite
def header_mutations(draw, data: bytes):
    """A corrupted copy of a safetensors file: bytes flipped in the header, a rewritten length prefix, a
    field of the header JSON changed, or the file cut short."""
    end = header_span(data)
    kind = draw(st.sampled_from(["flip", "length", "json", "truncate"]))
    if kind == "flip":
        out = bytearray(data[:end])
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, end - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out) + data[end:]
    if kind == "length":
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(end - 16, end + 16).map(lambda v: max(v - 8, 0))))
        return struct.pack("<Q", value) + data[8:]
    if kind == "truncate":
        return data[: draw(st.one_of(st.integers(0, end + 8), st.integers(end, len(data) - 1)))]
    header = json.loads(data[8:end])
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    value = draw(st.one_of(st.sampled_from(["F16", "BF16", "I64", "U8", "F64", "XX", "BOOL", ""]),
                           st.lists(st.integers(-2, 2**40), max_size=4), st.none(), st.integers(-5, 10)))
    if field is None:
        header.pop(name)
    else:
        header[name] = {**header[name], field: value}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[end:]


def check_weights_file(directory: Path, mutated: bytes, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(mutated)
    r4b_result(R4BForConditionalGeneration.from_pretrained, directory)


@fuzz_settings(FAST)
@given(data=st.data())
def test_from_pretrained_on_mutated_safetensors_headers(checkpoint_copy, data):
    directory, original, config = checkpoint_copy
    check_weights_file(directory, data.draw(header_mutations(original)), config)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(data=st.data())
def test_from_pretrained_on_mutated_safetensors_headers_long(checkpoint_copy, data):
    directory, original, config = checkpoint_copy
    check_weights_file(directory, data.draw(header_mutations(original)), config)


json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([-1, 0, 10**12, 2**63]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                        st.lists(st.integers(-1, 100), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                  max_size=2))


def config_paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in config.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += config_paths(value, (*prefix, key))
    return paths


@st.composite
def config_mutations(draw, config: dict):
    mutated = copy.deepcopy(config)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(config_paths(config)))
        parent = mutated
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if draw(st.booleans()):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(json_values)
    return mutated


def check_config(directory: Path, original: bytes, config: dict) -> None:
    (directory / "model.safetensors").write_bytes(original)
    (directory / "config.json").write_text(json.dumps(config))
    model = r4b_result(R4BForConditionalGeneration.from_pretrained, directory)
    if not isinstance(model, Exception):  # a config that still fits the tensors: the model runs
        r4b_result(model, input_ids=torch.tensor([[1, 2, 3]]))


@fuzz_settings(FAST)
@given(data=st.data())
def test_from_pretrained_on_mutated_config_values(checkpoint_copy, data):
    directory, original, config = checkpoint_copy
    check_config(directory, original, data.draw(config_mutations(config)))


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(data=st.data())
def test_from_pretrained_on_mutated_config_values_long(checkpoint_copy, data):
    directory, original, config = checkpoint_copy
    check_config(directory, original, data.draw(config_mutations(config)))
