"""Prefill timing for ``r4b bench``: text prompt, image prompt and the vision stage, r4b vs transformers.

Stages, each timed as r4b / transformers in alternating rounds on the same weights, medians:
- ``prefill_text``: a text prompt through the decoder into a cache, last-position logits;
- ``prefill_image``: a 640x480 picture (R-4B's anyres tiling: base view + tiles) spliced into a prompt,
  vision tower + projector + packing + decoder, last-position logits;
- ``vision``: the image side alone (tower, projector, packing): r4b's ``encode_images`` vs
  transformers' ``get_image_features``, the same stage in both.
A time ratio below 1 means r4b is faster.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from r4b_core.bench.decode import spread, sync
from r4b_core.config import R4BConfig
from r4b_core.generation.generate import prefill
from r4b_core.models.kv_cache import KVCache


def image_prompt(config: R4BConfig, device: torch.device, dtype: torch.dtype,
                 text_tokens: int) -> tuple[torch.Tensor, dict]:
    """(input_ids [1, T], {pixel_values, image_sizes}) for a 640x480 synthetic picture between two halves of
    ``text_tokens`` random text tokens."""
    from r4b_core.models.anyres import num_image_tokens
    from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
    from r4b_core.reference.synthetic import synthetic_picture

    picture = synthetic_picture(640, 480, seed=0)
    inputs = preprocess_images([picture], ImageProcessorConfig.for_model(config))
    n_image = num_image_tokens((picture.height, picture.width), config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(0, 1000, (1, text_tokens // 2), generator=gen),
                     torch.full((1, n_image), config.image_token_index),
                     torch.randint(0, 1000, (1, text_tokens - text_tokens // 2), generator=gen)], dim=1)  # [1, T]
    return ids.to(device), {"pixel_values": inputs["pixel_values"].to(device, dtype),
                            "image_sizes": inputs["image_sizes"]}


def _clock(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def prefill_stages(model: torch.nn.Module, ref: torch.nn.Module | None, text_ids: torch.Tensor,
                   image_ids: torch.Tensor, image_inputs: dict) -> dict[str, Callable[[], object]]:
    """The timed callables: ``<stage>/ours`` and, with a reference, ``<stage>/transformers``."""
    config = model.config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = text_ids.device

    def ours_prefill(ids: torch.Tensor, **inputs) -> torch.Tensor:
        cache = KVCache.for_model(config.text_config, 1, ids.shape[1], dtype=dtype, device=device)
        return prefill(model, ids, cache, **inputs)

    stages = {
        "prefill_text/ours": lambda: ours_prefill(text_ids),
        "prefill_image/ours": lambda: ours_prefill(image_ids, **image_inputs),
        "vision/ours": lambda: model.encode_images(image_inputs["pixel_values"], image_inputs["image_sizes"]),
    }
    if ref is not None:
        stages["prefill_text/transformers"] = lambda: ref(input_ids=text_ids, logits_to_keep=1)
        stages["prefill_image/transformers"] = lambda: ref(input_ids=image_ids, logits_to_keep=1, **image_inputs)
        stages["vision/transformers"] = lambda: ref.model.get_image_features(
            pixel_values=image_inputs["pixel_values"], image_sizes=image_inputs["image_sizes"])
    return stages


@torch.inference_mode()
def time_prefill(stages: dict[str, Callable[[], object]], device: torch.device, min_rounds: int, max_rounds: int,
                 max_spread: float, progress: Callable[[str], None]) -> dict:
    """One warm-up call each, then alternating rounds; {stage: {ours: timing, transformers: timing,
    time_ratio_ours_vs_transformers}} with timings in seconds (median, min, max, runs, spread)."""
    progress("warming up the prefill stages ...")
    for fn in stages.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in stages}
    for r in range(max_rounds):
        progress(f"prefill round {r + 1} (at least {min_rounds}, at most {max_rounds}) ...")
        for name, fn in stages.items():
            times[name].append(_clock(fn, device))
        if r + 1 >= min_rounds and all(spread(t) <= max_spread for t in times.values()):
            break
    result: dict[str, dict] = {}
    for name, values in times.items():
        stage, side = name.split("/")
        result.setdefault(stage, {})[side] = {"median_s": statistics.median(values), "min_s": min(values),
                                              "max_s": max(values), "runs": len(values), "spread": spread(values)}
    for stage in result.values():
        if "transformers" in stage:
            stage["time_ratio_ours_vs_transformers"] = stage["ours"]["median_s"] / stage["transformers"]["median_s"]
    return result
