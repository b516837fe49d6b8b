"""A small generated image-text task for fine-tuning demos and tests: pictures of coloured shapes.

    shape_example(i, seed) -> (PIL image, "a red circle")

Each picture is one shape (circle, square or triangle) in one of six colours on a light background,
with its size, position and the background shade jittered; everything is a deterministic function
of ``(seed, i)``, so every process of a distributed run draws the same example for the same index.
``shape_conversation`` wraps it as a one-turn chat: the user asks about the picture, the assistant
answers with the description.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is in the picture?"


def draw_shape(colour: str, shape: str, size: int = 56, rng: np.random.Generator | None = None) -> Image.Image:
    """A ``size`` x ``size`` RGB picture of one ``colour`` ``shape`` (jittered when ``rng`` is given)."""
    rng = rng or np.random.default_rng(0)
    shade = int(rng.integers(225, 256))
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    extent = size * rng.uniform(0.55, 0.85)  # the shape's width and height
    x0, y0 = rng.uniform(0, size - extent, size=2)
    box = [x0, y0, x0 + extent, y0 + extent]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}.")
    return img


def shape_example(index: int, seed: int = 0, size: int = 56) -> tuple[Image.Image, str]:
    """(picture, description) number ``index`` of the task drawn with ``seed``."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return draw_shape(colour, shape, size, rng), f"a {colour} {shape}"


def shape_conversation(description: str | None = None) -> list[dict]:
    """The chat for one example: an image and the question, then (when given) the description as the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if description is not None:
        messages.append({"role": "assistant", "content": description})
    return messages
