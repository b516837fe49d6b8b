"""Bodies of the ``r4b generate`` and ``r4b parity`` commands (the parser lives in cli.py)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.request
from pathlib import Path

import torch

THINK_START, THINK_END = "<think>", "</think>"


def open_image(source: str, max_pixels: int | None = None):
    """A PIL image from a local path or an http(s)/file URL (downloaded into memory)."""
    from PIL import Image

    from r4b_core.image_processing import load_image

    if "://" not in source:
        return load_image(Path(source)) if max_pixels is None else load_image(Path(source), max_pixels=max_pixels)
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


@torch.inference_mode()
def run_generate(args: argparse.Namespace) -> int:
    from r4b_core.generate import GenerationConfig, SamplingParams, TextStreamer, generate_steps
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.processor import R4BProcessor, split_thinking
    from r4b_weights.loader import resolve_dtype

    directory, synthetic = resolve_model_dir(args.model, args.revision)
    if synthetic and not args.json:
        print(f"(no --model: using the random-init synthetic checkpoint {directory}; its text is random)",
              file=sys.stderr)
    dtype = resolve_dtype(args.dtype)
    images = [open_image(src) for src in args.image]
    processor = R4BProcessor.from_pretrained(directory)
    t_load = time.perf_counter()
    model = R4BForConditionalGeneration.from_pretrained(directory, dtype=dtype, device=args.device,
                                                        progress=not args.json)
    t_load = time.perf_counter() - t_load
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    inputs = processor(messages=[{"role": "user", "content": content}], images=images or None,
                       thinking_mode=args.thinking_mode)
    inputs = {k: v.to(args.device) if k != "batch_num_images" else v for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    gen_config = GenerationConfig.from_pretrained(directory)
    defaults = gen_config.sampling(seed=args.seed)
    sampling = SamplingParams(
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        seed=args.seed,
    )
    eos = gen_config.eos_token_id or processor.eos_token_ids
    pad = gen_config.pad_token_id if gen_config.pad_token_id is not None else processor.pad_token_id
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)  # one prompt: no padding

    think_start = processor.tokenizer.token_to_id(THINK_START)
    think_end = processor.tokenizer.token_to_id(THINK_END)
    section = "thinking" if args.thinking_mode == "long" else "answer"  # long mode's prompt opens <think>
    streams = {"thinking": TextStreamer(processor.decode), "answer": TextStreamer(processor.decode)}
    printer = None if args.json else SectionPrinter()
    tokens: list[int] = []
    start = time.perf_counter()
    first = None
    for new, _ in generate_steps(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                 eos_token_ids=eos, pad_token_id=pad or 0, **inputs):
        token = int(new[0])
        first = first or time.perf_counter()
        tokens.append(token)
        if token == think_start:
            section = "thinking"
        elif token == think_end:
            section = "answer"
        elif printer is not None:
            printer.write(section, streams[section].push(token))
    end = time.perf_counter()
    if printer is not None:
        for name, stream in streams.items():
            printer.write(name, stream.flush())
        printer.close()

    text = processor.decode(tokens)
    prefix = THINK_START + "\n" if args.thinking_mode == "long" else ""
    thinking, answer = split_thinking(prefix + text)
    finish = "eos" if tokens and tokens[-1] in eos else "length"
    decode_rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else float("nan")
    summary = {
        "text": text, "thinking": thinking, "answer": answer, "tokens": tokens, "finish_reason": finish,
        "prompt_tokens": int(ids.shape[1]), "new_tokens": len(tokens), "time_to_first_token_s": first - start,
        "decode_tokens_per_s": decode_rate, "load_time_s": t_load, "model": str(directory),
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(f"[{len(tokens)} tokens ({finish}) · prompt {summary['prompt_tokens']} tokens · "
              f"TTFT {summary['time_to_first_token_s']:.2f} s · {decode_rate:.1f} tokens/s]", file=sys.stderr)
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
