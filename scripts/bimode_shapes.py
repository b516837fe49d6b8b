"""The bi-mode demo task of scripts/bpo.py: pictures of 1-4 shapes of one colour, two kinds of question.

    "colour": "What colour are the shapes?"                  -> "red"   (answerable at a glance)
    "count":  "How many shapes are there, times 5?"          -> "15"    (count, then multiply: a few steps;
                                                                         the factor, 2-6, is in the question)

Everything is a deterministic function of ``(seed, index)``. ``annealing_conversation`` is one bi-mode
annealing (SFT) example: the chat-template mode it is rendered in and the assistant turn, following R-4B's
recipe (arXiv 2508.21113) of training ONE model on thinking and non-thinking answers:

    auto mode   the model chooses; the curated examples think on a ``think_share`` of each kind's
                questions (AUTO_THINK_SHARE: 40 % of "count", 10 % of "colour"), a curation that
                under-thinks, so that after annealing greedy auto mode answers directly on both kinds:
                the "thinking atrophy" R-4B's BPO is there to fix (it must learn from the forced-mode
                rollouts that thinking pays on "count")
    long mode   forced thinking:     "<think>\\n3 shapes. 3 x 5 = 15\\n</think>\\n\\n15"
    short mode  forced non-thinking: "<think>\\n\\n</think>\\n\\n15"

so both forced modes answer both kinds of question in their format after annealing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from shapes_data import COLOURS, SHAPES  # scripts/shapes_data.py, next to this file

KINDS = ("colour", "count")
QUESTIONS = {"colour": "What colour are the shapes?", "count": "How many shapes are there, times {factor}?"}
MAX_SHAPES = 4
FACTORS = (2, 3, 4, 5, 6)  # the count question's multiplier: answered directly, it is a 4 x 5 table on the picture
AUTO_THINK_SHARE = {"colour": 0.1, "count": 0.4}  # share of auto-mode annealing examples that think, by kind


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
    factor = FACTORS[int(rng.integers(len(FACTORS)))]
    if kind == "colour":
        gold, answer_type, thought = colour, "text", f"the shapes are {colour}."
    else:
        gold, answer_type = str(factor * count), "number"
        thought = f"{count} shapes. {count} x {factor} = {factor * count}"
    return {"image": image, "kind": kind, "question": QUESTIONS[kind].format(factor=factor), "gold": gold,
            "answer_type": answer_type,
            "thought": thought, "mode_draw": float(rng.uniform()), "label_draw": float(rng.uniform())}


def user_turn(item: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]


def answer_text(item: dict, think: bool) -> str:
    """The assistant turn as the model writes it after the auto prompt (both forms start with <think>)."""
    if think:
        return f"<think>\n{item['thought']}\n</think>\n\n{item['gold']}"
    return f"<think>\n\n</think>\n\n{item['gold']}"


def annealing_conversation(item: dict, think_share: dict[str, float] | None = None) -> tuple[str, list[dict]]:
    """(thinking mode to render it in, messages) of one annealing example: half auto-mode examples with the
    curated choice (thinking on a ``think_share[kind]`` of them, default AUTO_THINK_SHARE), a quarter each
    forced long / short (module docstring)."""
    share = AUTO_THINK_SHARE if think_share is None else think_share
    if item["mode_draw"] < 0.5:
        mode = "auto"
        think = item["label_draw"] < share[item["kind"]]
    elif item["mode_draw"] < 0.75:
        mode, think = "long", True
    else:
        mode, think = "short", False
    return mode, user_turn(item) + [{"role": "assistant", "content": answer_text(item, think)}]
