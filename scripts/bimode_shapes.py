"""The bi-mode demo task of scripts/bpo.py: pictures of 1-4 shapes of one colour, two kinds of question.

    "colour": "What colour are the shapes?"                  -> "red"   (answerable at a glance)
    "count":  "How many shapes are there, times three?"      -> "9"     (count, then multiply: a few steps)

Everything is a deterministic function of ``(seed, index)``. ``annealing_conversation`` is one bi-mode
annealing (SFT) example: the chat-template mode it is rendered in and the assistant turn, following R-4B's
recipe (arXiv 2508.21113) of training ONE model on thinking and non-thinking answers:

    auto mode   the model chooses: the curated choice is thinking for "count", none for "colour", with a
                ``mislabel`` share of the other one (a heuristic curation is never perfect; BPO has to
                fix the rest)
    long mode   forced thinking:     "<think>\\n3 shapes. 3 x 3 = 9\\n</think>\\n\\n9"
    short mode  forced non-thinking: "<think>\\n\\n</think>\\n\\n9"

so both forced modes answer both kinds of question in their format after annealing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from shapes_data import COLOURS, SHAPES  # scripts/shapes_data.py, next to this file

KINDS = ("colour", "count")
QUESTIONS = {"colour": "What colour are the shapes?", "count": "How many shapes are there, times three?"}
MAX_SHAPES = 4


def draw_shapes(colour: str, count: int, size: int, rng: np.random.Generator) -> Image.Image:
    """``count`` shapes of ``colour``, one per cell of a 2 x 2 grid (cells chosen at random), light background."""
    shade = int(rng.integers(225, 256))
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    cell = size / 2
    for c in rng.permutation(4)[:count]:
        extent = cell * rng.uniform(0.6, 0.85)
        x0 = (c % 2) * cell + rng.uniform(0, cell - extent)
        y0 = (c // 2) * cell + rng.uniform(0, cell - extent)
        box = [x0, y0, x0 + extent, y0 + extent]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=COLOURS[colour])
    return img


def task_item(index: int, seed: int = 0, size: int = 56) -> dict:
    """Item ``index``: picture, kind, question, gold answer, answer type, and the thought that solves it."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    count = int(rng.integers(1, MAX_SHAPES + 1))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    image = draw_shapes(colour, count, size, rng)
    if kind == "colour":
        gold, answer_type, thought = colour, "text", f"the shapes are {colour}."
    else:
        gold, answer_type, thought = str(3 * count), "number", f"{count} shapes. {count} x 3 = {3 * count}"
    return {"image": image, "kind": kind, "question": QUESTIONS[kind], "gold": gold, "answer_type": answer_type,
            "thought": thought, "mode_draw": float(rng.uniform()), "label_draw": float(rng.uniform())}


def user_turn(item: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]


def answer_text(item: dict, think: bool) -> str:
    """The assistant turn as the model writes it after the auto prompt (both forms start with <think>)."""
    if think:
        return f"<think>\n{item['thought']}\n</think>\n\n{item['gold']}"
    return f"<think>\n\n</think>\n\n{item['gold']}"


def annealing_conversation(item: dict, mislabel: float = 0.2) -> tuple[str, list[dict]]:
    """(thinking mode to render it in, messages) of one annealing example: half auto-mode examples with the
    curated choice, a quarter each forced long / short (module docstring)."""
    if item["mode_draw"] < 0.5:
        mode = "auto"
        think = (item["kind"] == "count") != (item["label_draw"] < mislabel)
    elif item["mode_draw"] < 0.75:
        mode, think = "long", True
    else:
        mode, think = "short", False
    return mode, user_turn(item) + [{"role": "assistant", "content": answer_text(item, think)}]
