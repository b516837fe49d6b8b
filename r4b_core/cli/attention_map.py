"""``r4b attention-map``: where the model looks, painted over the picture (r4b_core/interp/attention_map.py).

Answers the prompt greedily for a few tokens (``--max-new-tokens``, default 4; ``--prompt-only`` skips
it), sums the attention from the answer's tokens (or the one ``--token``) to the image tokens over
``--layers`` (default all) and every head, maps it onto the picture (base view and tiles combined) and
writes a PNG with a translucent heat overlay (``--grid`` also outlines the tiles and their cells).
Prints where the attention went (``--json``: one object). Arguments are checked before the weights load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from r4b_core.cli.common import UsageError, add_chat_prompt_options, add_max_new_tokens, set_up


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "attention-map", parents=parents, help="paint the attention from the answer to the picture over it",
        description="Answer a question about one picture greedily, sum the attention that the answer's tokens (or "
                    "one chosen token) pay to the image tokens over the chosen layers and all heads, map it back onto "
                    "the picture (base view and tiles combined) and write it as a translucent overlay PNG. Default "
                    "checkpoint: the built-in random-init synthetic one (its attention is random).")
    add_chat_prompt_options(a, image="the picture (a file or http(s)/file URL)", prompt="the question about the picture",
                            thinking="chat template thinking mode (default short: the answer starts at once)",
                            thinking_default="short", one_image=True)
    a.add_argument("--out", required=True, metavar="PNG", help="where to write the overlay (a .png file)")
    a.add_argument("--force", action="store_true", help="replace --out if it exists")
    a.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="decoder layers to sum over (negative counts from the end; default: all)")
    a.add_argument("--token", type=int, metavar="INDEX",
                   help="measure from this one position of prompt + answer (negative from the end) instead of "
                        "the answer's tokens")
    add_max_new_tokens(a, 4, "greedy answer tokens whose attention is summed")
    a.add_argument("--prompt-only", action="store_true",
                   help="generate nothing: measure from the prompt's last token (or --token within the prompt)")
    a.add_argument("--opacity", type=float, default=0.65, help="overlay opacity at the hottest pixel (default 0.65)")
    a.add_argument("--grid", action="store_true", help="outline the tiles (cyan) and their cells (faint white)")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of the summary lines")
    return a


def _check_out(path: str, force: bool) -> Path:
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {path}: the overlay is written as PNG; give a path ending in .png.")
    if out.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file path ending in .png.")
    if (out.exists() or out.is_symlink()) and not force:  # a dangling link too: checked before the weights load
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it.")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory for --out.")
    return out


def run(args: argparse.Namespace) -> int:
    from r4b_core.interp.attention_map import compute_attention_map, render_overlay, save_png
    from r4b_core.interp.indices import check_layers
    from r4b_core.config import R4BConfig

    if not 0 <= args.opacity <= 1:
        raise UsageError(f"--opacity {args.opacity} must be between 0 and 1.")
    out = _check_out(args.out, args.force)
    setup = set_up(args, [args.image], synthetic_note=None if args.json else "its attention is random")
    picture = setup.images[0]
    config = R4BConfig.from_pretrained(setup.directory)
    check_layers(args.layers, config.text_config.num_hidden_layers)  # before the weights load
    processor = setup.load_processor()
    model = setup.load_model(progress=not args.json)
    result = compute_attention_map(model, processor, picture, args.prompt, layers=args.layers, token=args.token,
                                   new_tokens=0 if args.prompt_only else args.max_new_tokens,
                                   thinking_mode=args.thinking_mode)
    save_png(render_overlay(picture, result.heat, args.opacity, result.token_map if args.grid else None), out,
             force=args.force)
    tm, total = result.token_map, result.total_mass
    base = float(result.token_mass[tm.is_base].sum())
    summary = {
        "out": str(out), "picture": [picture.width, picture.height], "answer": result.answer_text,
        "answer_ids": result.answer_ids, "query_positions": result.query_positions, "layers": result.layers,
        "image_tokens": len(tm), "image_share": result.image_mass / total, "base_view_share": base / total,
        "tiles_share": (result.image_mass - base - result.newline_mass) / total,
        "newline_share": result.newline_mass / total,
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    layers = result.layers
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    span = f"{layers[0]}..{layers[-1]}" if contiguous else ",".join(map(str, layers))
    print(f"answer       {result.answer_text!r} ({len(result.answer_ids)} tokens)")
    print(f"queries      positions {result.query_positions} of {len(result.input_ids)}; layers {span}; "
          f"{config.text_config.num_attention_heads} heads")
    print(f"to picture   {100 * summary['image_share']:.1f}% of all attention ({len(tm)} image tokens): base view "
          f"{100 * summary['base_view_share']:.1f}%, tiles {100 * summary['tiles_share']:.1f}%, newline tokens "
          f"{100 * summary['newline_share']:.1f}% (no place on the picture)")
    print(f"wrote        {out} ({picture.width}x{picture.height})")
    return 0
