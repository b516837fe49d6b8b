"""torch.compile: the decode step and the text training forward trace without graph breaks, and
compiled greedy decoding gives the same tokens as eager."""

from __future__ import annotations

import pytest
import torch

from r4b_core.generation.generate import decode_step, generate, prefill
from r4b_core.models.kv_cache import KVCache


@torch.no_grad()
def test_decode_step_has_no_graph_breaks(tiny_model):
    cache = KVCache.for_model(tiny_model.config.text_config, batch_size=2, capacity=32)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    prefill(tiny_model, ids, cache)
    explanation = torch._dynamo.explain(decode_step)(tiny_model, ids[:, -1:], cache)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_text_training_forward_has_no_graph_breaks(tiny_model):
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    explanation = torch._dynamo.explain(lambda i, m: tiny_model(i, attention_mask=m, labels=i).loss)(ids, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_greedy_decoding_equals_eager(tiny_model):
    torch._dynamo.reset()
    ids = torch.randint(0, 500, (1, 11), generator=torch.Generator().manual_seed(2))
    eager = generate(tiny_model, ids, max_new_tokens=24)
    compiled = generate(tiny_model, ids, max_new_tokens=24, compile=True)
    assert compiled.tokens == eager.tokens and len(eager.tokens[0]) == 24
