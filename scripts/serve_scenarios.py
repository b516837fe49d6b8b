"""Two engine scenarios for ``r4b serve`` (issue 17), loopback only, bounded in requests and time:

    python scripts/serve_scenarios.py turns [--rounds 3] [--model DIR | --preset small]
    python scripts/serve_scenarios.py stall [--streams 4] [--long-prompt-tokens 3000] [--rounds 2]

turns: a chat about one picture over two turns. Turn 1 sends a new generated picture and a question;
turn 2 sends the same picture, the question, turn 1's answer and a follow-up. The time to first token
(TTFT) of both turns is measured on a server with the prefix cache (the default) and on one with
``--no-prefix-caching``, both running, the rounds alternating between them; each turn 1 shows a new picture. The figure is turn 2's TTFT over
turn 1's (median over rounds) for each server.

stall: ``--streams`` clients stream long answers; once each has streamed a few tokens, one more client
sends a ``--long-prompt-tokens``-token prompt. The figure is the largest gap between two tokens of the
running streams while that prompt is admitted (from its submission to its first token), next to their
median gap before it, on a server with the default per-step token budget (chunked prefill) and on one
with a budget as large as the prompt (the prompt prefilled in one step: the stall chunking avoids).

Both start their servers themselves (``scripts/load_test.py``'s ``StartedServer``) and stop them with
SIGTERM. The figures depend on the machine and on what else runs on it; say so when you report them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time

import httpx

from load_test import WORDS, StartedServer, sse_chunks  # scripts/ is on sys.path when this file runs

FOLLOW_UP = "and which shape is largest?"


def picture_data_uri(seed: int, size: int = 384) -> str:
    """A PNG of a few coloured rectangles, different for each seed, as a data: URI."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(size - 60), rng.randrange(size - 60)
        draw.rectangle([x, y, x + rng.randrange(20, 60), y + rng.randrange(20, 60)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stream_chat(url: str, model: str, messages: list, max_tokens: int, marks: list[float] | None = None,
                timeout_s: float = 600.0) -> tuple[float, str]:
    """Stream one chat completion: (seconds to its first text chunk, the answer's text). ``marks`` gets
    the time of every text chunk as it arrives."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "chat_template_kwargs": {"thinking_mode": "short"}}
    start, first, text = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout_s) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for chunk in sse_chunks(r):  # an error chunk raises StreamError
            for choice in (chunk or {}).get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece:
                    now = time.perf_counter()
                    first = now if first is None else first
                    if marks is not None:
                        marks.append(now)
                    text.append(piece)
    if first is None:
        raise RuntimeError("the stream ended without a text chunk")
    return first - start, "".join(text)


def served_model(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def turns_on(server: StartedServer, rounds: int, seed_base: int) -> list[tuple[float, float]]:
    """(turn 1 TTFT, turn 2 TTFT) per round, each round over a new picture."""
    model = served_model(server.url)
    out = []
    for i in range(rounds):
        picture = {"type": "image_url", "image_url": {"url": picture_data_uri(seed_base + i)}}
        first = [{"role": "user", "content": [picture, {"type": "text", "text": "how many shapes are there?"}]}]
        ttft1, answer = stream_chat(server.url, model, first, max_tokens=8)
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
        ttft2, _ = stream_chat(server.url, model, second, max_tokens=8)
        out.append((ttft1, ttft2))
        print(f"  round {i + 1}/{rounds}: turn 1 TTFT {ttft1:.2f} s, turn 2 {ttft2:.2f} s", file=sys.stderr, flush=True)
    return out


def long_prompt(model_dir: str, tokens: int) -> str:
    """Text whose chat-templated prompt is about ``tokens`` tokens (counted with the checkpoint's tokenizer)."""
    from r4b_core.processing.processor import R4BProcessor

    processor = R4BProcessor.from_pretrained(model_dir)
    words: list[str] = []
    while len(processor.encode(" ".join(words))) < tokens - 20:  # the template adds ~20
        words.extend(WORDS)
    while len(processor.encode(" ".join(words))) > tokens - 20:
        words.pop()
    return " ".join(words)


def stall_on(server: StartedServer, streams: int, prompt: str, stream_tokens: int) -> dict:
    """Largest and median inter-token gap of ``streams`` running streams around one long prompt's admission."""
    model = served_model(server.url)
    marks: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            stream_chat(server.url, model, [{"role": "user", "content": f"stream {i}: tell a long story"}],
                        stream_tokens, marks[i])
        except Exception as e:  # reported below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while min(len(m) for m in marks) < 8 and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    submitted = time.perf_counter()
    ttft, _ = stream_chat(server.url, model, [{"role": "user", "content": prompt}], max_tokens=2)
    admitted = submitted + ttft
    for t in threads:
        t.join(600)
    if errors:
        raise RuntimeError(errors[0])
    gaps_before, gaps_during = [], []
    for m in marks:
        for a, b in zip(m, m[1:]):
            if b <= submitted:
                gaps_before.append(b - a)
            elif a <= admitted:  # a gap that overlaps the admission window
                gaps_during.append(b - a)
    return {"long_prompt_ttft_s": round(ttft, 3), "median_gap_before_s": round(statistics.median(gaps_before), 4),
            "largest_gap_during_s": round(max(gaps_during, default=0.0), 4),
            "tokens_during": len(gaps_during)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["turns", "stall"])
    p.add_argument("--model", help="checkpoint (default: the --preset synthetic)")
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--threads", type=int, default=1, help="the servers' --threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="turns: pictures; stall: repeats per server (default 3)")
    p.add_argument("--streams", type=int, default=4, help="stall: running streams (default 4)")
    p.add_argument("--stream-tokens", type=int, default=160, help="stall: tokens per running stream (default 160)")
    p.add_argument("--long-prompt-tokens", type=int, default=3000, help="stall: the long prompt (default 3000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if min(args.rounds, args.streams, args.stream_tokens, args.long_prompt_tokens) < 1:
        p.error("--rounds, --streams, --stream-tokens and --long-prompt-tokens must be positive")
    from r4b_core.reference.synthetic import cached_synthetic_checkpoint

    model_dir = args.model or str(cached_synthetic_checkpoint(args.preset))
    common = ("--threads", str(args.threads))
    report: dict = {"scenario": args.scenario, "model": model_dir}
    if args.scenario == "turns":  # both servers up at once, the rounds alternating between them
        names = {"prefix_cache": (), "no_prefix_cache": ("--no-prefix-caching",)}
        servers = {}
        try:
            for name, extra in names.items():
                print(f"{name}: starting r4b serve ...", file=sys.stderr, flush=True)
                servers[name] = StartedServer(model_dir, 8, None, f"/tmp/r4b-scenario-{name}.log", extra=common + extra)
            rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for i in range(args.rounds):
                for k, name in enumerate(names):
                    print(f"{name}:", file=sys.stderr, end="")
                    rounds[name] += turns_on(servers[name], 1, seed_base=2 * i + k)
        finally:
            for server in servers.values():
                server.stop()
        for name, pairs in rounds.items():
            report[name] = {"turn1_ttft_s": [round(a, 3) for a, _ in pairs],
                            "turn2_ttft_s": [round(b, 3) for _, b in pairs],
                            "turn2_over_turn1": round(statistics.median(b / a for a, b in pairs), 3)}
    else:
        prompt = long_prompt(model_dir, args.long_prompt_tokens)
        budget = str(args.long_prompt_tokens + 64)
        for name, extra in (("chunked", ()), ("one_step", ("--max-num-batched-tokens", budget))):
            print(f"{name}: starting r4b serve ...", file=sys.stderr, flush=True)
            server = StartedServer(model_dir, args.streams + 1, None, "/tmp/r4b-scenario-server.log",
                                   extra=common + extra)
            try:
                # each round's prompt opens differently: a repeat would be served from the prefix cache
                report[name] = [stall_on(server, args.streams, f"round {r}: {prompt}", args.stream_tokens)
                                for r in range(args.rounds)]
            finally:
                server.stop()
            print(f"  {name}: {report[name]}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def format_report(report: dict) -> str:
    lines = [f"{report['scenario']} on {report['model']} (a shared machine: figures are indicative)"]
    if report["scenario"] == "turns":
        for name in ("prefix_cache", "no_prefix_cache"):
            r = report[name]
            lines.append(f"{name:16s} turn 1 TTFT median {statistics.median(r['turn1_ttft_s']):.2f} s, turn 2 "
                         f"{statistics.median(r['turn2_ttft_s']):.2f} s, turn 2 / turn 1 {r['turn2_over_turn1']:.3f}")
    else:
        for name in ("chunked", "one_step"):
            runs = report[name]
            lines.append(f"{name:9s} largest gap while the long prompt is admitted "
                         f"{max(r['largest_gap_during_s'] for r in runs):.3f} s (median gap before "
                         f"{statistics.median(r['median_gap_before_s'] for r in runs):.3f} s); long prompt TTFT "
                         f"{statistics.median(r['long_prompt_ttft_s'] for r in runs):.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
