"""``r4b generate``: answer a prompt about image(s), streaming the thinking (set apart) and the answer.

Loads the checkpoint (default: the built-in random-init synthetic one, whose text is random), builds
the chat prompt with the thinking mode, streams the model's output and ends with a one-line summary
on stderr (tokens, finish reason, time to first token, decode rate; the decode step is compiled and warmed
up on a throwaway cache first, so neither figure includes that time, which is reported on its own);
``--json`` prints one object instead. Arguments and the whole prompt (images and their pixel limit, placeholders, length) are checked
before the weights load. On a terminal, control characters in the model's text are shown escaped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from r4b_core.cli.common import (
    add_chat_prompt_options,
    add_max_new_tokens,
    add_quantize,
    finite_float,
    non_negative_int,
    progress_to_stderr,
    seed_int,
    set_up,
)


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    g = subparsers.add_parser(
        "generate", parents=parents, help="answer a question about image(s), streaming thinking and answer",
        description="Load a checkpoint (default: the built-in random-init synthetic one; its text is random), "
                    "build the chat prompt (with the thinking mode), and stream the model's thinking (set apart) "
                    "and answer, then a one-line summary.")
    add_chat_prompt_options(
        g, image="an image file or http(s)/file URL; repeat for several images (each becomes <image>)",
        prompt="the question or instruction",
        thinking="auto: the model decides whether to think (default); long: always think; short: answer "
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
    g.add_argument("--seed", type=seed_int, help="random seed for sampling (default: not seeded)")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, thinking, answer, tokens, "
                                                       "timings) instead of streaming")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (CUDA graphs on GPU); it is compiled before the "
                        "prompt runs and the compile time is reported on its own")
    add_quantize(g)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "triton"],
                   help="decode attention: auto (Triton on CUDA when supported, else SDPA), sdpa, or triton")
    return g


# C0 controls but newline and tab, DEL, and C1 controls: on a terminal they move the cursor, recolour, retitle
# the window or worse; model output is shown with them escaped (\x1b), never interpreted
_CONTROL_CHARS = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7f, 0xa0)] if chr(c) not in "\n\t"}


def escape_control_chars(text: str) -> str:
    """``text`` with every C0 / C1 control character except newline and tab written as a visible escape."""
    return text.translate(_CONTROL_CHARS)


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
        if self.tty:  # model output never reaches the terminal as escape sequences
            text = escape_control_chars(text)
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
    import torch

    from r4b_core.generation.chat import ChatStream
    from r4b_core.generation.generate import check_lengths, warm_up_decode_step
    from r4b_core.models.fast_linears import fast_linears
    from r4b_core.generation.thinking_budget import thinking_budget_for

    setup = set_up(args, args.image, synthetic_note=None if args.json else "its text is random")
    images, directory = setup.images, setup.directory
    processor = setup.load_processor()  # reads generation_config.json, once
    gen_config = processor.generation_config
    sampling = gen_config.sampling(args.seed, temperature=args.temperature, top_k=args.top_k,  # checked now,
                                   top_p=args.top_p)                                            # before the load
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    messages = [{"role": "user", "content": content}]
    # the whole prompt (template, placeholders, images, length) is checked here, before the weights load
    inputs = processor(messages=messages, images=images or None, thinking_mode=args.thinking_mode)
    prompt_tokens = inputs["input_ids"].shape[1]
    check_lengths(prompt_tokens, args.max_new_tokens, prompt_tokens + args.max_new_tokens,
                  processor.config.text_config.max_position_embeddings)
    thinking_budget_for(processor, inputs["input_ids"][0].tolist(), args.max_thinking_tokens)  # its checks, too
    t_load = time.perf_counter()
    model = setup.load_model(progress=not args.json)
    t_load = time.perf_counter() - t_load
    linears = fast_linears(model, args.quantize, compile=args.compile)
    if args.compile and not args.json:
        progress_to_stderr("(compiling the decode step ...)")
    # compile and first-call set-up happen here, on a throwaway cache of the real shape: not in TTFT or tokens/s
    t_warm = warm_up_decode_step(model, 1, prompt_tokens + args.max_new_tokens - 1, compile=args.compile,
                                 attention_backend=args.attention_backend)
    stream = ChatStream(model, processor, messages, images or None, inputs=inputs,
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
                   "load_time_s": t_load, "compile_time_s": t_warm if args.compile else None,
                   "warm_up_time_s": t_warm, "linears": linears, "threads": torch.get_num_threads(),
                   "model": str(directory)}
        print(json.dumps(summary, ensure_ascii=False))
    else:
        rate = "n/a" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
        progress_to_stderr(f"[{len(r.tokens)} tokens ({r.finish_reason}) · prompt {r.prompt_tokens} tokens · "
                           f"TTFT {r.time_to_first_token_s:.2f} s · {rate} tokens/s · "
                           + (f"compiled in {t_warm:.1f} s · " if args.compile else "")
                           + (f"{linears} linears · " if linears != "none" else "")
                           + f"weights loaded in {t_load:.1f} s]")
    return 0
