"""The load test's yardstick: ``generate()`` in the load-test process on the server's own checkpoint and
prompt ids, so a server stream's decode rate can be read against it (scripts/load_test.py sweep)."""

from __future__ import annotations

import time

import httpx


class GenerateReference:
    """``generate()`` in this process on the server's checkpoint as ``r4b generate`` runs it (``--quantize
    auto`` packed for one row; the server packs for its batch size), with the server's ``--threads``, fed the
    server's own prompt ids for the sweep's prompt: its decode tokens/s is what one client should approach."""

    def __init__(self, model_dir: str, threads: int | None, prompt_ids: list[int]) -> None:
        import torch

        from r4b_core.models.fast_linears import fast_linears
        from r4b_core.models.r4b import R4BForConditionalGeneration

        if threads:
            torch.set_num_threads(threads)
        self.model = R4BForConditionalGeneration.from_pretrained(model_dir).eval()
        fast_linears(self.model, "auto")
        self.ids = torch.tensor([prompt_ids])  # [1, T]

    def decode_rate(self, max_new_tokens: int) -> float:
        """Decode tokens/s after the first token of one greedy run of ``max_new_tokens`` (no eos)."""
        import torch

        from r4b_core.generation.generate import generate_steps

        marks = []
        with torch.inference_mode():
            for _ in generate_steps(self.model, self.ids, max_new_tokens=max_new_tokens):
                marks.append(time.perf_counter())
        return (len(marks) - 1) / (marks[-1] - marks[0])


def prompt_token_ids(url: str, model: str, prompt: str) -> list[int]:
    """The ids the server runs for ``prompt`` (chat template, short thinking), via ``return_token_ids``."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
            "return_token_ids": True, "chat_template_kwargs": {"thinking_mode": "short"}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["prompt_token_ids"]
