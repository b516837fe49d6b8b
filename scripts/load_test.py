"""Load test for ``r4b serve``: loopback only, with a bounded number of requests and a time limit.

    python scripts/load_test.py sweep [--concurrency 1,4,8] [--requests-per-client 2] [--rounds 3] [--max-tokens 48]
    python scripts/load_test.py soak  [--requests 200] [--concurrency 8]

sweep: at each concurrency, that many clients each stream ``--requests-per-client`` requests of one
prompt length and exactly ``--max-tokens`` new tokens (``ignore_eos``); the levels run in turn, for
``--rounds`` rounds. It reports the aggregate decode rate (completion tokens per second of wall time,
all clients together; the median over rounds), time to first token and request latency (p50 / p95),
and each level's rate relative to the first level (the median of the per-round ratios).

soak: ``--requests`` requests with random prompt lengths (``--min/--max-prompt-words``) and random
output lengths (1..``--max-tokens``), half of them streamed, at ``--concurrency``; it reports how
many completed, failed (an HTTP error or a broken connection) or were lost (a 200 whose answer
never finished: no ``[DONE]`` / finish_reason), the engine's counters, and the server's resident
memory (RSS) after a warm-up of ``--warmup-requests`` random requests and after the run (sampled every
half second in between).

Without ``--url`` the script starts ``r4b serve`` itself on a free loopback port, on the synthetic
checkpoint of ``--preset`` (default small, cached in the r4b cache) or ``--model``, and stops it with
SIGTERM at the end. ``--url`` must be a loopback address. The figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

from generate_reference import GenerateReference, prompt_token_ids  # scripts/ is on sys.path

from r4b_core.cli.serve import is_loopback as is_loopback_host

WORDS = ("the picture shows a red square blue circle green triangle on white background how many shapes are there "
         "describe image in detail count compare sizes answer cat sitting wooden table next to cup of tea").split()


@dataclass
class Result:
    ok: bool
    lost: bool = False
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    completion_tokens: int = 0
    finish_reason: str | None = None
    decode_s: float | None = None  # first to last streamed text chunk
    gaps_s: list[float] | None = None  # between consecutive streamed text chunks

    @property
    def decode_rate(self) -> float | None:
        """This stream's decode tokens/s after its first token: (tokens - 1) / (last - first chunk)."""
        if not self.decode_s or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / self.decode_s


# ---------------------------------------------------------------------------------------------
# one request


class StreamError(RuntimeError):
    """The server sent an error object inside an SSE stream (its JSON, shortened)."""


def sse_chunks(response: httpx.Response) -> Iterator[dict | None]:
    """The JSON chunks of an OpenAI SSE stream in order, then ``None`` for its closing ``data: [DONE]`` (missing
    when the stream broke off: the request was lost). An error chunk raises ``StreamError``."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            yield None
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise StreamError(json.dumps(chunk["error"])[:200])
        yield chunk


def run_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, stream: bool,
                ignore_eos: bool, timeout_s: float) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": ignore_eos, "chat_template_kwargs": {"thinking_mode": "short"}}
    start = time.perf_counter()
    try:
        if not stream:
            r = client.post(url + "/v1/chat/completions", json=body, timeout=timeout_s)
            latency = time.perf_counter() - start
            if r.status_code != 200:
                return Result(False, status=r.status_code, error=r.text[:200], latency_s=latency)
            data = r.json()
            finish = data["choices"][0].get("finish_reason")
            return Result(finish is not None, lost=finish is None, status=200, latency_s=latency, ttft_s=None,
                          completion_tokens=data["usage"]["completion_tokens"], finish_reason=finish)
        body.update(stream=True, stream_options={"include_usage": True})
        ttft, tokens, finish, done, marks = None, 0, None, False, []
        with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                r.read()
                return Result(False, status=r.status_code, error=r.text[:200], latency_s=time.perf_counter() - start)
            for chunk in sse_chunks(r):
                if chunk is None:
                    done = True
                    break
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        marks.append(time.perf_counter())
                        ttft = marks[0] - start if ttft is None else ttft
                    finish = choice.get("finish_reason") or finish
        latency = time.perf_counter() - start
        lost = not done or finish is None
        return Result(not lost, lost=lost, status=200, ttft_s=ttft, latency_s=latency, completion_tokens=tokens,
                      finish_reason=finish, decode_s=marks[-1] - marks[0] if len(marks) > 1 else None,
                      gaps_s=[b - a for a, b in zip(marks, marks[1:])])
    except StreamError as e:
        return Result(False, status=200, error=str(e), latency_s=time.perf_counter() - start)
    except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}"[:200], latency_s=time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(results: list[Result], wall_s: float) -> dict:
    good = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    latencies = [r.latency_s for r in good]
    gaps = [g for r in good for g in (r.gaps_s or [])]
    decode_rates = [r.decode_rate for r in good if r.decode_rate is not None]
    return {"requests": len(results), "completed": len(good), "failed": sum(not r.ok and not r.lost for r in results),
            "lost": sum(r.lost for r in results), "completion_tokens": tokens, "wall_s": round(wall_s, 3),
            "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
            "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
            "itl_p50_s": percentile(gaps, 0.5), "itl_p95_s": percentile(gaps, 0.95),
            "stream_decode_tokens_per_s_p50": percentile(decode_rates, 0.5),
            "errors": sorted({r.error for r in results if r.error})[:5]}


def run_batch(url: str, model: str, jobs: list[dict], concurrency: int, deadline: float, timeout_s: float) -> tuple:
    """Run ``jobs`` with ``concurrency`` clients; jobs not started before ``deadline`` are skipped."""
    results: list[Result] = []
    lock = threading.Lock()
    pending = list(jobs)
    skipped = 0

    def worker() -> None:
        nonlocal skipped
        with httpx.Client() as client:
            while True:
                with lock:
                    if not pending:
                        return
                    job = pending.pop(0)
                    if time.monotonic() > deadline:
                        skipped += 1
                        continue
                result = run_request(client, url, model, timeout_s=timeout_s, **job)
                with lock:
                    results.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return results, time.perf_counter() - start, skipped


# ---------------------------------------------------------------------------------------------
# the server


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlparse(url).hostname or "")


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class StartedServer:
    """``r4b serve`` in a subprocess on a free loopback port; SIGTERM on stop."""

    def __init__(self, model_dir: str, max_batch_size: int, max_seq_len: int | None, log_path: str,
                 extra: tuple[str, ...] = ()) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "r4b_core.cli", "serve", "--model", model_dir, "--port", str(self.port),
                   "--max-batch-size", str(max_batch_size), "--max-queue", "1024", "--log-level", "warning", *extra]
        if max_seq_len is not None:
            command += ["--max-seq-len", str(max_seq_len)]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"r4b serve exited with status {self.process.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("r4b serve did not start within 600 s")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()


def sweep_prompt(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


# ---------------------------------------------------------------------------------------------
# the two modes


def sweep(args, url: str, model: str, deadline: float, reference: GenerateReference | None = None) -> dict:
    """Each round runs ``generate()`` once (``reference``) and every level once, in order (rounds alternate
    them, so a load that drifts on a shared machine hits them alike); per level: the median rate over
    rounds, and the median of its per-round ratio to the first level and of its streams' decode rate to
    generate()'s."""
    prompt = sweep_prompt(args.prompt_words)
    runs: dict[int, list[tuple[list[Result], float, int]]] = {c: [] for c in args.concurrency}
    generate_rates: list[float] = []
    for round_index in range(args.rounds):
        if reference is not None:
            generate_rates.append(reference.decode_rate(args.max_tokens))
            print(f"round {round_index + 1}/{args.rounds} generate(): {generate_rates[-1]:.2f} decode tokens/s",
                  file=sys.stderr, flush=True)
        for concurrency in args.concurrency:
            jobs = [dict(prompt=f"{round_index}.{i}: {prompt}", max_tokens=args.max_tokens, stream=True,
                         ignore_eos=True) for i in range(concurrency * args.requests_per_client)]
            runs[concurrency].append(run_batch(url, model, jobs, concurrency, deadline, args.timeout))
            rate = summarize(*runs[concurrency][-1][:2])["tokens_per_s"]
            print(f"round {round_index + 1}/{args.rounds} concurrency {concurrency}: {rate} tokens/s", file=sys.stderr,
                  flush=True)
    first = args.concurrency[0]
    levels = {}
    for concurrency, rounds in runs.items():
        rates = [summarize(results, wall)["tokens_per_s"] or 0.0 for results, wall, _ in rounds]
        base = [summarize(results, wall)["tokens_per_s"] or float("nan") for results, wall, _ in runs[first]]
        ratios = [rate / b for rate, b in zip(rates, base)]
        pooled = summarize([r for results, _, _ in rounds for r in results], sum(wall for _, wall, _ in rounds))
        levels[concurrency] = {**pooled, "tokens_per_s": round(statistics.median(rates), 2),
                               "tokens_per_s_rounds": rates, "speedup_vs_first": round(statistics.median(ratios), 2),
                               "skipped": sum(skipped for _, _, skipped in rounds)}
        if generate_rates:  # each round's median stream decode rate over that round's generate() rate
            stream = [statistics.median([r.decode_rate for r in results if r.ok and r.decode_rate] or [0.0])
                      for results, _, _ in rounds]
            levels[concurrency]["stream_vs_generate"] = round(statistics.median(
                a / g for a, g in zip(stream, generate_rates)), 3)
    return {"mode": "sweep", "prompt_words": args.prompt_words, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "levels": levels, "generate_decode_tokens_per_s": round(statistics.median(generate_rates), 2)
            if generate_rates else None}


def soak(args, url: str, model: str, deadline: float, pid: int | None) -> dict:
    rng = random.Random(args.seed)
    jobs = [dict(prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(args.min_prompt_words,
                                                                              args.max_prompt_words))),
                 max_tokens=rng.randint(1, args.max_tokens), stream=rng.random() < 0.5, ignore_eos=rng.random() < 0.5)
            for _ in range(args.requests + args.warmup_requests)]
    warmup, jobs = jobs[:args.warmup_requests], jobs[args.warmup_requests:]
    if warmup:  # the server's allocator grows to the largest shapes here, not during the measured run
        run_batch(url, model, warmup, args.concurrency[-1], deadline, args.timeout)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            if (value := rss_mib(pid)) is not None:
                samples.append(value)

    rss_before = rss_mib(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results, wall, skipped = run_batch(url, model, jobs, args.concurrency[-1], deadline, args.timeout)
    stop.set()
    sampler.join()
    time.sleep(1.0)
    health = httpx.get(url + "/health", timeout=10).json()
    rss_after = rss_mib(pid)
    return {"mode": "soak", "concurrency": args.concurrency[-1], **summarize(results, wall), "skipped": skipped,
            "rss_mib_before": rss_before, "rss_mib_after": rss_after,
            "rss_mib_max_during": max(samples) if samples else None, "engine": health}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sweep", "soak"])
    p.add_argument("--url", help="a running server (loopback only), e.g. http://127.0.0.1:8000; default: start one")
    p.add_argument("--model", help="checkpoint for the server this script starts (default: the --preset synthetic)")
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="synthetic checkpoint (default small)")
    p.add_argument("--served-model", help="model id to send (default: the server's /v1/models entry)")
    p.add_argument("--max-batch-size", type=int, default=8, help="slots of the server started here (default 8)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="its --max-seq-len (default 1024)")
    p.add_argument("--concurrency", default="1,4,8", help="sweep levels (soak uses the last; default 1,4,8)")
    p.add_argument("--requests-per-client", type=int, default=2, help="sweep: requests per client (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="sweep: rounds over the levels (default 3)")
    p.add_argument("--requests", type=int, default=200, help="soak: number of requests (default 200)")
    p.add_argument("--prompt-words", type=int, default=32, help="sweep: prompt length in words (default 32)")
    p.add_argument("--min-prompt-words", type=int, default=1, help="soak: shortest prompt (default 1)")
    p.add_argument("--max-prompt-words", type=int, default=300, help="soak: longest prompt (default 300)")
    p.add_argument("--max-tokens", type=int, default=48, help="sweep: tokens per request; soak: the most (default 48)")
    p.add_argument("--seed", type=int, default=0, help="soak: random seed (default 0)")
    p.add_argument("--warmup-requests", type=int, default=16,
                   help="soak: random requests before the 'before' memory reading (default 16)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds (default 300)")
    p.add_argument("--max-duration", type=float, default=1800.0,
                   help="stop starting requests after this many seconds (default 1800)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server started here and of the generate() reference (default: the "
                        "physical cores, what r4b serve uses on an idle machine; fixed, so runs compare)")
    p.add_argument("--no-generate", action="store_true",
                   help="sweep: skip the in-process generate() reference (it needs the checkpoint: --model or --preset)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    counts = (args.requests, args.max_tokens, args.requests_per_client, args.rounds)
    if min(args.concurrency) < 1 or min(counts) < 1:
        p.error("concurrency, request counts and --max-tokens must be positive")
    if args.url is not None and not is_loopback(args.url):
        p.error(f"--url {args.url}: this load test only talks to a loopback address (127.0.0.1, ::1, localhost)")

    server = None
    model_dir = args.model
    if args.threads is None:  # not r4b serve's load-aware rule: its 1-minute load average lags a run behind
        from r4b_core.threads import physical_cores
        args.threads = physical_cores()
    if args.url is None:
        from r4b_core.reference.synthetic import cached_synthetic_checkpoint

        model_dir = args.model or str(cached_synthetic_checkpoint(args.preset))
        print(f"starting r4b serve on {model_dir} ...", file=sys.stderr, flush=True)
        server = StartedServer(model_dir, args.max_batch_size, args.max_seq_len,
                               log_path=os.environ.get("R4B_LOAD_TEST_LOG", "/tmp/r4b-load-test-server.log"),
                               extra=("--threads", str(args.threads)) if args.threads else ())
    url = args.url or server.url
    try:
        model = args.served_model or httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        warm = run_request(httpx.Client(), url, model, "warm up", 4, True, True, args.timeout)
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error or warm.status}")
        deadline = time.monotonic() + args.max_duration
        pid = server.pid if server else None
        if args.mode == "sweep":
            reference = None
            if model_dir and not args.no_generate:
                ids = prompt_token_ids(url, model, sweep_prompt(args.prompt_words))
                reference = GenerateReference(model_dir, args.threads, ids)
            report = sweep(args, url, model, deadline, reference)
        else:
            report = soak(args, url, model, deadline, pid)
    finally:
        status = server.stop() if server else None
    report.update(url=url, model=model, server_exit_status=status, cpu_count=os.cpu_count(), threads=args.threads,
                  load_average=os.getloadavg())
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    groups = report["levels"].values() if args.mode == "sweep" else [report]
    return 0 if all(g["lost"] == 0 and g["failed"] == 0 for g in groups) else 1


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(report: dict) -> str:
    lines = [f"server {report['url']} model {report['model']}; {report['cpu_count']} CPUs, {report['threads']} "
             f"threads, load average "
             f"{', '.join(f'{x:.1f}' for x in report['load_average'])} (a shared machine: figures are indicative)"]
    if report["mode"] == "sweep":
        lines.append(f"{report['max_tokens']} tokens per request (ignore_eos), {report['prompt_words']}-word prompt, "
                     f"{report['rounds']} rounds (tokens/s: median over rounds)")
        if report.get("generate_decode_tokens_per_s"):
            lines.append(f"generate() on the same weights, same prompt: {report['generate_decode_tokens_per_s']:.2f} "
                         "decode tokens/s (median over rounds)")
        lines.append("concurrency  done/req  tokens/s  vs first  stream/generate  TTFT p50/p95 s  ITL p50/p95 ms  "
                     "failed  lost")
        for c, r in report["levels"].items():
            itl = "/".join("-" if r[k] is None else f"{r[k] * 1e3:.0f}" for k in ("itl_p50_s", "itl_p95_s"))
            lines.append(f"{c:>11}  {r['completed']:>4}/{r['requests']:<3}  {_s(r['tokens_per_s']):>8}  "
                         f"{_s(r['speedup_vs_first']):>8}  {_s(r.get('stream_vs_generate')):>15}  "
                         f"{_s(r['ttft_p50_s']):>6}/{_s(r['ttft_p95_s']):<6}  {itl:>14}  {r['failed']:>6}  {r['lost']:>4}")
    else:
        engine = report["engine"]
        lines.append(f"soak: {report['requests']} requests at concurrency {report['concurrency']} in "
                     f"{report['wall_s']:.1f} s: {report['completed']} completed, {report['failed']} failed, "
                     f"{report['lost']} lost, {report['skipped']} not started (time limit)")
        lines.append(f"tokens {report['completion_tokens']} ({_s(report['tokens_per_s'])}/s); latency p50/p95 "
                     f"{_s(report['latency_p50_s'])}/{_s(report['latency_p95_s'])} s")
        lines.append(f"server RSS MiB: before {_s(report['rss_mib_before'])}, after {_s(report['rss_mib_after'])}, "
                     f"max during {_s(report['rss_mib_max_during'])}")
        lines.append(f"engine after: active {engine['active']}, queued {engine['queued']}, finished stop/length/"
                     f"cancelled/error {engine['finished_stop']}/{engine['finished_length']}/"
                     f"{engine['finished_cancelled']}/{engine['finished_error']}")
    errors = report.get("errors") or [e for r in report.get("levels", {}).values() for e in r["errors"]]
    lines += [f"error: {e}" for e in errors[:5]]
    lines.append(f"server exit status after SIGTERM: {report['server_exit_status']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
