"""Bodies of the ``r4b generate`` and ``r4b parity`` commands (the parser lives in cli.py)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.request
from pathlib import Path


def open_image(source: str):
    """A PIL image from a local path or an http(s)/file URL (downloaded into memory)."""
    from PIL import Image

    from r4b_core.image_processing import load_image

    if "://" not in source:
        return load_image(Path(source))
    try:
        with urllib.request.urlopen(source, timeout=30) as response:
            data = response.read()
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: cannot download the image ({e}).") from None
    try:
        return load_image(Image.open(io.BytesIO(data)))
    except OSError as e:
        raise ValueError(f"{source}: the downloaded data is not an image PIL can read ({e}).") from None


def resolve_model_dir(model: str | None, revision: str | None) -> tuple[Path, bool]:
    """(local checkpoint directory, whether it is the built-in synthetic one)."""
    from r4b_core.synthetic import cached_synthetic_checkpoint
    from r4b_weights import resolve_checkpoint

    if model is None:
        return cached_synthetic_checkpoint("tiny"), True
    return resolve_checkpoint(model, revision), False


class SectionPrinter:
    """Prints streamed text with the thinking set apart from the answer.

    On a terminal the thinking is dim; otherwise it sits under a "thinking:" header and the answer
    under an "answer:" header.
    """

    def __init__(self, out=None) -> None:
        self.out = out if out is not None else sys.stdout
        self.tty = self.out.isatty()
        self.section: str | None = None

    def write(self, section: str, text: str) -> None:
        if not text:
            return
        if section != self.section:
            if self.tty:
                self.out.write("\x1b[2m" if section == "thinking" else "\x1b[0m")
                if self.section == "thinking":
                    self.out.write("\n")
            else:
                self.out.write(("\n" if self.section else "") + f"{section}:\n")
            self.section = section
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.section == "thinking":
            self.out.write("\x1b[0m")
        self.out.write("\n")
        self.out.flush()


def run_generate(args: argparse.Namespace) -> int:
    from r4b_core.generate import ChatStream, GenerationConfig, SamplingParams
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.processor import R4BProcessor
    from r4b_weights.loader import resolve_dtype

    directory, synthetic = resolve_model_dir(args.model, args.revision)
    if synthetic and not args.json:
        print(f"(no --model: using the random-init synthetic checkpoint {directory}; its text is random)",
              file=sys.stderr)
    images = [open_image(src) for src in args.image]
    processor = R4BProcessor.from_pretrained(directory)
    t_load = time.perf_counter()
    model = R4BForConditionalGeneration.from_pretrained(directory, dtype=resolve_dtype(args.dtype),
                                                        device=args.device, progress=not args.json)
    t_load = time.perf_counter() - t_load
    gen_config = GenerationConfig.from_pretrained(directory)
    defaults = gen_config.sampling(seed=args.seed)
    sampling = SamplingParams(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        seed=args.seed,
    )
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    stream = ChatStream(model, processor, [{"role": "user", "content": content}], images or None,
                        thinking_mode=args.thinking_mode, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        generation_config=gen_config, compile=args.compile, attention_backend=args.attention_backend)
    printer = None if args.json else SectionPrinter()
    for section, delta in stream:
        if printer is not None:
            printer.write(section, delta)
    if printer is not None:
        printer.close()
    r = stream.result
    if args.json:
        summary = {"text": r.text, "thinking": r.thinking, "answer": r.answer, "tokens": r.tokens,
                   "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens, "new_tokens": len(r.tokens),
                   "time_to_first_token_s": r.time_to_first_token_s, "decode_tokens_per_s": r.decode_tokens_per_s,
                   "load_time_s": t_load, "model": str(directory)}
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(f"[{len(r.tokens)} tokens ({r.finish_reason}) · prompt {r.prompt_tokens} tokens · "
              f"TTFT {r.time_to_first_token_s:.2f} s · {r.decode_tokens_per_s:.1f} tokens/s · "
              f"weights loaded in {t_load:.1f} s]", file=sys.stderr)
    return 0


def run_parity_command(args: argparse.Namespace) -> int:
    from r4b_core.parity import run_parity
    from r4b_weights.loader import resolve_dtype

    directory, synthetic = resolve_model_dir(args.model, args.revision)
    image = open_image(args.image) if args.image else None
    report = run_parity(directory, image=image, prompt=args.prompt, dtype=resolve_dtype(args.dtype),
                        greedy_tokens=args.greedy_tokens, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        label = " (built-in synthetic checkpoint)" if synthetic else ""
        print(f"parity: r4b vs transformers on {directory}{label}, {report.dtype}")
        print(report.table())
    return 0 if report.passed else 1
