"""``r4b generate``: answer a prompt about image(s), streaming the thinking (set apart) and the answer.

Loads the checkpoint (default: the built-in random-init synthetic one, whose text is random), builds
the chat prompt with the thinking mode, streams the model's output and ends with a one-line summary
on stderr (tokens, finish reason, time to first token, decode rate); ``--json`` prints one object
instead. Arguments are checked before the weights load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from r4b_core.cli.common import (
    add_max_new_tokens,
    checkpoint_dir,
    compute_dtype,
    finite_float,
    non_negative_int,
    open_image,
    progress_to_stderr,
    torch_device,
)


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    g = subparsers.add_parser(
        "generate", parents=parents, help="answer a question about image(s), streaming thinking and answer",
        description="Load a checkpoint (default: the built-in random-init synthetic one; its text is random), "
                    "build the chat prompt (with the thinking mode), and stream the model's thinking (set apart) "
                    "and answer, then a one-line summary.")
    g.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image file or http(s)/file URL; repeat for several images (each becomes <image>)")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--thinking-mode", default="auto", choices=["auto", "long", "short"],
                   help="auto: the model decides whether to think (default); long: always think; short: answer "
                        "without thinking")
    add_max_new_tokens(g, 1024, "stop after this many new tokens")
    g.add_argument("--max-thinking-tokens", type=non_negative_int, metavar="N",
                   help="thinking budget: after N thinking tokens r4b closes the thinking (</think>) and the model "
                        "answers (default: no limit)")
    g.add_argument("--temperature", type=finite_float,
                   help="0 = greedy; default: generation_config.json's sampling, else greedy")
    g.add_argument("--top-p", type=finite_float,
                   help="nucleus sampling threshold in (0, 1] (default: the checkpoint's)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = off (default: the "
                                             "checkpoint's)")
    g.add_argument("--seed", type=int, help="random seed for sampling (default: not seeded)")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, thinking, answer, tokens, "
                                                       "timings) instead of streaming")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (CUDA graphs on GPU); the first call compiles")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "triton"],
                   help="decode attention: auto (Triton on CUDA when supported, else SDPA), sdpa, or triton")
    return g


class SectionPrinter:
    """Prints streamed text with the thinking set apart from the answer.

    On a terminal the thinking is dim; otherwise it sits under a "thinking:" header and the answer
    under an "answer:" header.
    """

    def __init__(self, out: TextIO | None = None) -> None:
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


def run(args: argparse.Namespace) -> int:
    from r4b_core.chat import ChatStream
    from r4b_core.generation_config import SamplingParams
    from r4b_core.model import R4BForConditionalGeneration
    from r4b_core.processor import R4BProcessor

    device = torch_device(args.device)
    directory, synthetic = checkpoint_dir(args)
    dtype = compute_dtype(args.dtype, directory)
    if synthetic and not args.json:
        progress_to_stderr(f"(no --model: using the random-init synthetic checkpoint {directory}; its text is random)")
    processor = R4BProcessor.from_pretrained(directory)  # reads generation_config.json, once
    gen_config = processor.generation_config
    defaults = gen_config.sampling(seed=args.seed)
    sampling = SamplingParams(  # checks the values before the weights load
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        seed=args.seed,
    )
    images = [open_image(src) for src in args.image]
    t_load = time.perf_counter()
    model = R4BForConditionalGeneration.from_pretrained(directory, dtype=dtype, device=device,
                                                        progress=not args.json)
    t_load = time.perf_counter() - t_load
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    stream = ChatStream(model, processor, [{"role": "user", "content": content}], images or None,
                        thinking_mode=args.thinking_mode, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        generation_config=gen_config, compile=args.compile, attention_backend=args.attention_backend,
                        max_thinking_tokens=args.max_thinking_tokens)
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
        rate = "n/a" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
        progress_to_stderr(f"[{len(r.tokens)} tokens ({r.finish_reason}) · prompt {r.prompt_tokens} tokens · "
                           f"TTFT {r.time_to_first_token_s:.2f} s · {rate} tokens/s · "
                           f"weights loaded in {t_load:.1f} s]")
    return 0
