"""Helpers of the r4b_tiny_images lmms-eval task: draw each document's image, ask, score by exact match."""

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220)}


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """One 96x96 RGB image: the document's shape in its colour on white."""
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    fill = COLOURS[doc["colour"]]
    if doc["shape"] == "square":
        draw.rectangle((20, 20, 76, 76), fill=fill)
    elif doc["shape"] == "circle":
        draw.ellipse((18, 18, 78, 78), fill=fill)
    else:
        draw.polygon([(48, 14), (82, 80), (14, 80)], fill=fill)
    return [image]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return f"{doc['question']} Answer with one word."


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = (results[0] or "").strip().strip(".").lower()
    return {"exact_match": float(prediction == doc["answer"])}
