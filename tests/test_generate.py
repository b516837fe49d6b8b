"""Generation: greedy tokens equal transformers' generate, cached equals uncached, a batch equals its
sequences run alone, stopping, length errors, sampling, the shared preparation and timings (generate.py);
UTF-8-safe streaming, chat / ChatStream / chat_batch and the thinking split (chat.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import picture

from r4b_core.models.anyres import num_image_tokens
from r4b_core.generation.chat import ChatStream, chat, chat_batch, split_thinking
from r4b_core.generation.sections import TextStreamer
from r4b_core.generation.generate import decode_tokens_per_s, generate, prepare_generation, sample_next_token
from r4b_core.generation_config import GenerationConfig, SamplingParams
from r4b_core.processing.image_processing import ImageProcessorConfig, preprocess_images
from r4b_core.models.kv_cache import KVCache
from r4b_core.processing.processor import R4BProcessor

EOS = [151645, 151643]
PAD = 151643


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tiny_model, tiny_reference):
    """(checkpoint dir, ours, transformers reference): the session's shared tiny ones (conftest.py), read-only."""
    return tiny_checkpoint, tiny_model, tiny_reference


def _text_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 151000, (1, length), generator=torch.Generator().manual_seed(seed))


def _image_inputs(directory, config, width=150, height=90, seed=0):
    inputs = preprocess_images([picture(width, height, seed)], ImageProcessorConfig.from_pretrained(directory))
    n = num_image_tokens((height, width), config)
    ids = torch.cat([_text_ids(4, seed), torch.full((1, n), config.image_token_index), _text_ids(6, seed + 1)], 1)
    return ids, {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}


def _hf_greedy(ref, ids, max_new_tokens, **kwargs):
    out = ref.generate(input_ids=ids, attention_mask=kwargs.pop("attention_mask", torch.ones_like(ids)),
                       do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD, **kwargs)
    rows = out[:, ids.shape[1]:].tolist()
    # transformers pads a finished sequence to the batch's length; ours ends it at its eos
    return [row[: next((i + 1 for i, t in enumerate(row) if t in EOS), len(row))] for row in rows]


def test_greedy_text_prompt_equals_transformers(pair):
    _, ours, ref = pair
    ids = _text_ids(12, seed=0)
    out = generate(ours, ids, max_new_tokens=40, eos_token_ids=EOS, pad_token_id=PAD)
    assert len(out.tokens[0]) == 40 and out.finish_reasons == ["length"]
    assert out.tokens == _hf_greedy(ref, ids, 40)


def test_greedy_image_prompt_equals_transformers(pair):
    directory, ours, ref = pair
    ids, images = _image_inputs(directory, ours.config)
    out = generate(ours, ids, max_new_tokens=36, eos_token_ids=EOS, pad_token_id=PAD, **images)
    assert len(out.tokens[0]) == 36
    assert out.tokens == _hf_greedy(ref, ids, 36, **images)
    text_only = generate(ours, ids.masked_fill(ids == ours.config.image_token_index, 0), max_new_tokens=36)
    assert text_only.tokens != out.tokens  # the image matters


@torch.no_grad()
def test_cached_decode_equals_uncached(pair):
    _, ours, _ = pair
    ids = _text_ids(10, seed=5)
    cached = generate(ours, ids, max_new_tokens=32).tokens[0]
    seq = ids
    for _ in range(32):
        nxt = ours(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert cached == seq[0, ids.shape[1]:].tolist()


def test_batch_of_two_equals_each_alone(pair):
    directory, ours, ref = pair
    image_ids, images = _image_inputs(directory, ours.config, 100, 60, seed=3)
    text_ids = _text_ids(9, seed=4)
    width = image_ids.shape[1]
    batch = torch.full((2, width), PAD)
    mask = torch.zeros(2, width, dtype=torch.long)
    batch[0], mask[0] = image_ids[0], 1
    batch[1, width - 9:], mask[1, width - 9:] = text_ids[0], 1
    together = generate(ours, batch, attention_mask=mask, max_new_tokens=32, eos_token_ids=EOS, pad_token_id=PAD,
                        **images)
    alone_image = generate(ours, image_ids, max_new_tokens=32, eos_token_ids=EOS, pad_token_id=PAD, **images)
    alone_text = generate(ours, text_ids, max_new_tokens=32, eos_token_ids=EOS, pad_token_id=PAD)
    assert together.tokens == [alone_image.tokens[0], alone_text.tokens[0]]
    assert together.tokens == _hf_greedy(ref, batch, 32, attention_mask=mask, **images)


def test_stops_at_eos_and_pads_finished_sequences(pair):
    _, ours, _ = pair
    ids = torch.cat([_text_ids(8, seed=6), _text_ids(8, seed=7)])
    free = generate(ours, ids, max_new_tokens=12)
    stop_token = free.tokens[0][3]  # make sequence 0's 4th token an eos
    assert stop_token not in free.tokens[1]
    out = generate(ours, ids, max_new_tokens=12, eos_token_ids=[stop_token], pad_token_id=PAD)
    assert out.tokens[0] == free.tokens[0][:4] and out.finish_reasons == ["eos", "length"]
    assert out.tokens[1] == free.tokens[1]


def test_length_errors_come_before_any_compute(pair):
    _, ours, _ = pair
    ids = _text_ids(10, seed=0)
    max_pos = ours.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(ours, ids, max_new_tokens=max_pos)
    small = KVCache.for_model(ours.config.text_config, 1, 12)
    with pytest.raises(ValueError, match="KV cache of 19 slots but it has 12"):
        generate(ours, ids, max_new_tokens=10, kv_cache=small)
    assert small.seq_lens.tolist() == [0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, ids, max_new_tokens=0)


def test_sampling_is_seeded_and_filters_apply(pair):
    _, ours, _ = pair
    ids = _text_ids(8, seed=9)
    greedy = generate(ours, ids, max_new_tokens=16).tokens
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=11)
    a, b = generate(ours, ids, max_new_tokens=16, sampling=params).tokens, generate(ours, ids, max_new_tokens=16, sampling=params).tokens
    assert a == b and a != greedy
    assert generate(ours, ids, max_new_tokens=16, sampling=SamplingParams(temperature=2.0, top_k=1, seed=1)).tokens == greedy
    assert generate(ours, ids, max_new_tokens=16, sampling=SamplingParams(temperature=2.0, top_p=1e-6, seed=1)).tokens == greedy


def test_sample_next_token_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample_next_token(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), gen)
    assert set(nucleus.tolist()) == {0}  # p(0) ~ 0.5 already crosses 0.5
    free = sample_next_token(logits, SamplingParams(temperature=1.0), gen)
    assert set(free.tolist()) == {0, 1, 2, 3, 4}
    freq0 = (free == 0).float().mean().item()
    assert abs(freq0 - logits[0].softmax(-1)[0].item()) < 0.04
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_streamer_never_splits_a_character():
    text = "héllo 世界 🎉👩‍👩‍👧 done"
    data = list(text.encode("utf-8"))  # one token per byte: every multi-byte character is split

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    streamer = TextStreamer(decode)
    deltas = [streamer.push(b) for b in data] + [streamer.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 10  # it does stream


def test_generation_config_file(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == []
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True, "temperature": 0.6,
         "top_k": 20, "top_p": 0.95}))
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert cfg.eos_token_id == [151645, 151643] and cfg.pad_token_id == 151643
    assert cfg.sampling(seed=1) == SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [7]
    assert GenerationConfig.from_pretrained(tmp_path).sampling() == SamplingParams()


def test_chat_stream_sections_and_result(pair):
    directory, ours, _ = pair
    processor = R4BProcessor.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    image = picture(120, 80, 5)
    stream = ChatStream(ours, processor, messages, [image], thinking_mode="long", max_new_tokens=24)
    pieces = list(stream)
    result = stream.result
    assert len(result.tokens) == 24 or result.finish_reason == "eos"
    thinking = "".join(d for s, d in pieces if s == "thinking")
    answer = "".join(d for s, d in pieces if s == "answer")
    end_think = processor.tokenizer.token_to_id("</think>")
    if end_think in result.tokens:  # long mode: everything before </think> is thinking
        assert result.thinking == thinking.strip() and result.answer == answer.strip()
    else:
        assert pieces and all(s == "thinking" for s, _ in pieces)
        assert result.thinking == thinking.strip() and result.answer == ""
    # the streamed deltas, assembled, are the one-shot decode of each section's tokens (split here, not by
    # the stream); random weights write byte-level noise, so characters do get cut across tokens
    assert processor.tokenizer.token_to_id("<think>") not in result.tokens and result.tokens.count(end_think) <= 1
    cut = result.tokens.index(end_think) if end_think in result.tokens else len(result.tokens)
    assert thinking == processor.decode(result.tokens[:cut])
    assert answer == processor.decode(result.tokens[cut + 1:])
    # chat level = token level: the same prompt through generate() with the tokenizer's stop ids
    inputs = processor(messages=messages, images=[image], thinking_mode="long")
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    direct = generate(ours, ids, max_new_tokens=24, eos_token_ids=processor.eos_token_ids,
                      pad_token_id=processor.pad_token_id, **inputs)
    assert result.tokens == direct.tokens[0] and result.finish_reason == direct.finish_reasons[0]
    assert result.prompt_tokens == ids.shape[1] > 16


def test_chat_batch_equals_chat_alone(pair):
    directory, ours, _ = pair
    processor = R4BProcessor.from_pretrained(directory)
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text_only = [{"role": "user", "content": "Count to three."}]
    image = picture(90, 150, 6)
    batch = chat_batch(ours, processor, [with_image, text_only], [[image], []], thinking_mode="short",
                       max_new_tokens=20)
    alone = [chat(ours, processor, with_image, [image], thinking_mode="short", max_new_tokens=20),
             chat(ours, processor, text_only, thinking_mode="short", max_new_tokens=20)]
    assert [r.tokens for r in batch] == [r.tokens for r in alone]
    assert [(r.text, r.thinking, r.answer) for r in batch] == [(r.text, r.thinking, r.answer) for r in alone]


def test_streamer_over_the_checkpoint_tokenizer(pair):
    """Byte-level BPE: the multi-byte characters below take several tokens each; streaming them one
    token at a time gives the text back without a replacement character in any delta."""
    processor = R4BProcessor.from_pretrained(pair[0])
    text = "naïve café: 世界 🎉👩‍👩‍👧 ✓"
    ids = processor.encode(text, add_special_tokens=False)
    assert any("\ufffd" in processor.decode([i]) for i in ids)  # some token holds part of a character
    streamer = TextStreamer(processor.decode)
    deltas = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_no_decode_rate_without_a_decode_phase(pair):
    """One new token: TTFT but no decode phase; the rate is None (JSON null), never NaN."""
    directory, ours, _ = pair
    one = generate(ours, _text_ids(6, seed=1), max_new_tokens=1)
    assert len(one.tokens[0]) == 1 and one.decode_tokens_per_s is None and one.time_to_first_token_s > 0
    two = generate(ours, _text_ids(6, seed=1), max_new_tokens=2)
    assert two.decode_tokens_per_s > 0
    assert decode_tokens_per_s([1, 1], 0.5) is None and decode_tokens_per_s([3, 1], 0.5) == 4.0
    result = chat(ours, R4BProcessor.from_pretrained(directory), [{"role": "user", "content": "hi"}],
                  max_new_tokens=1)
    assert result.decode_tokens_per_s is None
    json.loads(json.dumps(vars(result), allow_nan=False))  # strict JSON: would raise on NaN


def test_prepare_generation_chooses_ids_and_moves_inputs():
    """Argument, else generation_config.json, else the default; pixel_values take the model's dtype."""
    model = torch.nn.Linear(2, 2).to(torch.float64)
    ids = torch.tensor([[1, 2, 3]])
    pixels = torch.zeros(1, 1, 3, 4, 4)
    config = GenerationConfig(eos_token_id=[7, 8], pad_token_id=9, do_sample=True, temperature=0.5)
    p = prepare_generation(model, ids, {"pixel_values": pixels, "image_sizes": torch.tensor([[4, 4]])},
                           generation_config=config, default_eos_token_ids=[1], default_pad_token_id=2)
    assert (p.eos_token_ids, p.pad_token_id, p.sampling.temperature) == ([7, 8], 9, 0.5)
    assert p.inputs["pixel_values"].dtype == torch.float64 and p.inputs["image_sizes"].tolist() == [[4, 4]]
    p = prepare_generation(model, ids, generation_config=GenerationConfig(), default_eos_token_ids=[1],
                           default_pad_token_id=2)
    assert (p.eos_token_ids, p.pad_token_id, p.sampling) == ([1], 2, SamplingParams())
    p = prepare_generation(model, ids, eos_token_ids=(), pad_token_id=0, sampling=SamplingParams(top_k=3),
                           generation_config=config)
    assert (p.eos_token_ids, p.pad_token_id, p.sampling.top_k) == ([], 0, 3)


@pytest.mark.parametrize("text, expected", [
    ("<think>\nLet me count.\n</think>\n\nThree.", ("Let me count.", "Three.")),
    ("<think>\n\n</think>\n\nThree.", ("", "Three.")),  # auto mode that chose not to think
    ("Let me count.\n</think>\n\nThree.", ("Let me count.", "Three.")),  # long mode: prompt ended in <think>\n
    ("<think>\nStill counting", ("Still counting", "")),  # cut off while thinking
    (" Three.\n", (None, " Three.\n")),  # short mode: no tags, the text as is
    ("", (None, "")),
])
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected
