"""Where the model looks: attention from chosen tokens to the image, as a heat map on the picture.

``r4b attention-map`` runs this. The steps:

1. the prompt (one picture + a question) is answered greedily for a few tokens (``new_tokens``; 0 keeps
   the prompt alone);
2. one forward over prompt + answer records, at each chosen decoder layer, the attention pattern rows of
   the query positions, summed over heads (a hook on ``...self_attn.hook_pattern`` reduces each layer's
   [B, H, T, T] pattern as it goes, so memory holds one layer's pattern, never all of them). The queries
   are the positions whose outputs were the answer's tokens (the prompt's last token and every answer
   token but the last), or one chosen position;
3. the mass on each image token goes to its box on the picture (``image_regions``): base-view patches
   and tile cells add up into one density at the picture's resolution; newline tokens have no place and
   are reported apart;
4. ``render_overlay`` paints it over the picture as a translucent colour (Pillow + numpy only);
   ``save_png`` writes the PNG atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from r4b_core.generation.generate import generate
from r4b_core.models.hooks import hooks
from r4b_core.interp.image_regions import ImageTokenMap, heat_on_picture, image_token_map, token_boxes
from r4b_core.interp.indices import check_layers
from r4b_weights.atomic_file import replacing

PATTERN_HOOK = "language_model.model.layers.{}.self_attn.hook_pattern"  # [B, H, T, T] softmax probabilities


@dataclass
class AttentionMap:
    """Attention mass from ``query_positions`` to the image, summed over ``layers`` and all heads.

    ``token_mass`` [N] per image token (``token_map`` order); ``heat`` [H, W] float64 the same mass spread
    over the picture (mass per pixel). ``total_mass`` = layers x heads x queries (every pattern row sums to
    one), so ``image_mass / total_mass`` is the share of all attention that went to the picture.
    """

    heat: torch.Tensor
    token_mass: torch.Tensor
    token_map: ImageTokenMap
    query_positions: list[int]
    layers: list[int]
    total_mass: float
    input_ids: list[int]
    answer_ids: list[int]
    answer_text: str

    @property
    def image_mass(self) -> float:
        return float(self.token_mass.sum())

    @property
    def newline_mass(self) -> float:
        return float(self.token_mass[self.token_map.is_newline].sum())


def attention_rows(model: torch.nn.Module, inputs: dict, query_positions: Sequence[int],
                   layers: Sequence[int]) -> torch.Tensor:
    """One forward of ``inputs`` (a single sequence); the pattern rows of ``query_positions`` at each of
    ``layers``, summed over heads: float32 [len(layers), Q, T]."""
    rows: dict[int, torch.Tensor] = {}
    index = torch.tensor(list(query_positions))

    def keep_rows(layer: int):
        def hook(pattern: torch.Tensor, name: str) -> None:
            rows[layer] = pattern[0, :, index.to(pattern.device), :].float().sum(0).cpu()  # [Q, T]
        return hook

    with torch.no_grad(), hooks(model, [(PATTERN_HOOK.format(i), keep_rows(i)) for i in layers]):
        model(**inputs, logits_to_keep=1)
    missing = [i for i in layers if i not in rows]
    if missing:
        raise RuntimeError(f"the attention pattern of layer(s) {missing} was not recorded; the model's forward "
                           f"did not reach {PATTERN_HOOK.format(missing[0])!r}.")
    return torch.stack([rows[i] for i in layers])


def compute_attention_map(
    model: torch.nn.Module,
    processor,
    picture: Image.Image,
    prompt: str,
    *,
    layers: Sequence[int] | None = None,
    token: int | None = None,
    new_tokens: int = 4,
    thinking_mode: str = "short",
) -> AttentionMap:
    """Answer ``prompt`` about ``picture`` greedily for ``new_tokens`` tokens, then measure the attention
    to the image (see the module docstring). ``token``: one position of prompt + answer (negative from the
    end) as the only query, instead of the answer's tokens. ``layers``: decoder layers (default all)."""
    if new_tokens < 0:
        raise ValueError(f"new_tokens = {new_tokens} must be >= 0 (0: the prompt alone).")
    n_layers = model.config.text_config.num_hidden_layers
    chosen = check_layers(layers, n_layers)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = processor(messages=messages, images=[picture], thinking_mode=thinking_mode)
    parameter = next(model.parameters())
    prompt_ids = inputs["input_ids"].to(parameter.device)
    image_inputs = {"pixel_values": inputs["pixel_values"].to(parameter.device, parameter.dtype),
                    "image_sizes": inputs["image_sizes"], "batch_num_images": inputs["batch_num_images"]}
    answer: list[int] = []
    if new_tokens:
        out = generate(model, prompt_ids, max_new_tokens=new_tokens, eos_token_ids=processor.eos_token_ids,
                       **image_inputs)
        answer = out.tokens[0]
    ids = torch.cat([prompt_ids, torch.tensor([answer], dtype=prompt_ids.dtype, device=prompt_ids.device)], 1)
    length = ids.shape[1]
    if token is not None:
        if not -length <= token < length:
            raise ValueError(f"token {token} is out of range: the sequence has {length} tokens (prompt "
                             f"{prompt_ids.shape[1]} + answer {len(answer)}).")
        queries = [token % length]
    elif answer:
        queries = list(range(prompt_ids.shape[1] - 1, length - 1))
    else:
        queries = [prompt_ids.shape[1] - 1]
    rows = attention_rows(model, {"input_ids": ids, **image_inputs}, queries, chosen)  # [L, Q, T]
    token_map = image_token_map(model.config, inputs["image_sizes"], ids.cpu(),
                                batch_num_images=inputs["batch_num_images"])
    mass = rows.sum((0, 1)).double()[token_map.position]  # [N]
    heads = model.config.text_config.num_attention_heads
    return AttentionMap(heat=heat_on_picture(token_map, mass), token_mass=mass, token_map=token_map,
                        query_positions=queries, layers=chosen, total_mass=float(len(chosen) * heads * len(queries)),
                        input_ids=ids[0].tolist(), answer_ids=list(answer), answer_text=processor.decode(answer))


# ---------------------------------------------------------------------------------------------
# rendering


def _colour_ramp(v: np.ndarray) -> np.ndarray:
    """[..] in 0..1 -> [.., 3] uint8: dark red through red and orange to yellow."""
    r = np.clip(0.35 + 1.3 * v, 0, 1)
    g = np.clip(1.6 * v - 0.6, 0, 1)
    b = np.zeros_like(v)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def render_overlay(picture: Image.Image, heat: torch.Tensor, opacity: float = 0.65,
                   token_map: ImageTokenMap | None = None) -> Image.Image:
    """``picture`` (RGB) with ``heat`` [H, W] painted over it: colour and opacity grow with heat / max.

    ``token_map``: also outline every tile-map cell (thin) and every tile (thick), to check alignment.
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity = {opacity} must be in [0, 1].")
    base = picture.convert("RGB")
    if tuple(heat.shape) != (base.height, base.width):
        raise ValueError(f"heat has shape {tuple(heat.shape)}; the picture is {base.height} x {base.width} (H x W).")
    v = heat.double().numpy()
    top = v.max()
    v = v / top if top > 0 else np.zeros_like(v)
    overlay = np.concatenate([_colour_ramp(v), (opacity * 255 * np.sqrt(v)).round().astype(np.uint8)[..., None]], -1)
    out = Image.alpha_composite(base.convert("RGBA"), Image.fromarray(overlay, "RGBA"))
    if token_map is not None:
        out = _draw_grid(out, token_map)
    return out.convert("RGB")


def _draw_grid(image: Image.Image, token_map: ImageTokenMap) -> Image.Image:
    """Outlines of image 0's tile-map cells (faint) and of each tile's cells together (bright)."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cells = (token_map.image == 0) & ~token_map.is_base & ~token_map.is_newline
    boxes, views = token_boxes(token_map)[cells], token_map.view[cells]
    for x0, y0, x1, y1 in boxes.tolist():
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255, 60))
    for view in views.unique().tolist():
        b = boxes[views == view]
        b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
        if len(b):
            draw.rectangle([float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()) - 1,
                            float(b[:, 3].max()) - 1], outline=(0, 255, 255, 220), width=2)
    return Image.alpha_composite(image, layer)


def save_png(image: Image.Image, path: str | Path, force: bool = False) -> Path:
    """Write ``image`` as a PNG at ``path`` atomically (a temporary file in the same folder, then a rename).
    An existing file is replaced only with ``force``."""
    path = Path(path).expanduser()
    if (path.exists() or path.is_symlink()) and not force:  # a dangling link is the user's too
        raise FileExistsError(f"{path} already exists; choose another --out or pass --force to replace it.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory for the output file.")
    with replacing(path) as tmp:  # a killed write's temporary is removed by the next one (atomic_file.py)
        image.save(tmp, format="PNG")
    return path
