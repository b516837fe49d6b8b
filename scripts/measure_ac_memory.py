#!/usr/bin/env python
"""Measure what activation checkpointing saves: one forward + backward, with and without it, on the CPU.

    python scripts/measure_ac_memory.py [--preset small] [--batch 1] [--width 640 --height 480]

Each configuration runs in a fresh process (so neither inherits the other's allocator state) on a
random-init model of ``--preset`` (fp32, built in memory: no mmap'd weights in the RSS), with a batch
of pictures of ``--width`` x ``--height`` plus ``--text-tokens`` text tokens, labels on the text.
Two numbers per configuration:

- activations saved for backward: bytes of the distinct tensors autograd keeps for backward, recorded
  with ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded (tensors saved inside a
  checkpointed block are not kept, so they are not seen; the block inputs the checkpoints keep are
  added from their shapes);
- peak RSS during the step minus the RSS before it (``/proc/self/status`` VmHWM after resetting it
  through ``/proc/self/clear_refs``; Linux only). This includes the logits, the loss and the
  gradients (allocated during backward), which checkpointing does not touch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    import torch

    from r4b_core.models.anyres import num_image_tokens
    from r4b_core.config import preset
    from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
    from shapes_data import draw_shape
    from r4b_core.reference.synthetic import build_synthetic_model
    from r4b_core.training.model_setup import apply_activation_checkpointing

    torch.manual_seed(0)
    config = preset(args.preset)
    model = build_synthetic_model(config, seed=0).train()
    kept_by_checkpoints = 0
    if args.ac:
        apply_activation_checkpointing(model)
    images = [draw_shape("red", "circle", 64).resize((args.width, args.height)) for _ in range(args.batch)]
    pixels = preprocess_images([[im] for im in images], ImageProcessorConfig.for_model(config))
    n_image = num_image_tokens((args.height, args.width), config)
    ids = torch.randint(0, 1000, (args.batch, n_image + args.text_tokens))
    ids[:, 2: 2 + n_image] = config.image_token_index
    labels = ids.masked_fill(ids == config.image_token_index, -100)
    labels[:, : 2 + n_image] = -100
    if args.ac:  # the checkpoints keep each block's input: [views, patches, Dv] and [B, T, C], fp32
        views = int(pixels["pixel_values"].shape[1]) * args.batch
        side = config.vision_config.image_size // config.vision_config.patch_size
        vcfg, tcfg = config.vision_config, config.text_config
        kept_by_checkpoints = 4 * (vcfg.num_hidden_layers * views * side * side * vcfg.hidden_size
                                   + tcfg.num_hidden_layers * ids.numel() * tcfg.hidden_size)

    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"], labels=labels).loss
    loss.backward()
    peak = rss_kib("VmHWM")
    return {"ac": args.ac, "tokens": ids.numel(), "image_tokens": n_image * args.batch,
            "saved_for_backward_gb": (sum(saved.values()) + kept_by_checkpoints) / 1e9,
            "kept_by_checkpoints_gb": kept_by_checkpoints / 1e9,
            "peak_rss_above_start_gb": (peak - before) * 1024 / 1e9,
            "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--ac", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.ac is not None:
        print(json.dumps(child(args)))
        return
    results = []
    for ac in (0, 1):
        cmd = [sys.executable, __file__, "--ac", str(ac), "--preset", args.preset, "--batch", str(args.batch),
               "--width", str(args.width), "--height", str(args.height), "--text-tokens", str(args.text_tokens)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    off, on = results
    print(f"{args.preset}: batch {args.batch}, {off['tokens']} tokens ({off['image_tokens']} image tokens)")
    for r in results:
        print(f"  activation checkpointing {'on ' if r['ac'] else 'off'}: activations saved for backward "
              f"{r['saved_for_backward_gb']:.2f} GB (checkpoint inputs {r['kept_by_checkpoints_gb']:.2f} GB), "
              f"peak RSS above start {r['peak_rss_above_start_gb']:.2f} GB, loss {r['loss']:.6f}")
    for key in ("saved_for_backward_gb", "peak_rss_above_start_gb"):
        print(f"  {key}: -{off[key] - on[key]:.2f} GB ({100 * (on[key] - off[key]) / off[key]:+.0f} %)")


if __name__ == "__main__":
    main()
