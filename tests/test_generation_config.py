"""generation_config.json: read once (the processor keeps it), every value type- and range-checked with an
error naming the file and the key; SamplingParams applies the same value rules to a caller's values."""

from __future__ import annotations

import json
import math
import re

import pytest

from r4b_core.generation_config import GenerationConfig, SamplingParams
from r4b_core.processing.processor import R4BProcessor

QWEN3_GENERATION = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                    "transformers_version": "4.51.0"}  # Qwen3-4B's file (r4b_spec.md §3.4)


def _write(tmp_path, d):
    (tmp_path / "generation_config.json").write_text(json.dumps(d))
    return tmp_path / "generation_config.json"


def test_reads_qwen3s_file(tmp_path):
    _write(tmp_path, QWEN3_GENERATION)
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.do_sample) == ([151645, 151643], 151643, True)
    assert cfg.sampling(seed=3) == SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=3)


def test_absent_file_and_absent_keys(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig(eos_token_id=[], pad_token_id=None)
    assert GenerationConfig.from_pretrained(tmp_path).sampling() == SamplingParams(temperature=0.0)  # greedy
    _write(tmp_path, {"eos_token_id": 7, "do_sample": True, "top_k": None})
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert cfg.eos_token_id == [7]
    assert cfg.sampling() == SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    _write(tmp_path, {"do_sample": True, "temperature": 0})
    assert GenerationConfig.from_pretrained(tmp_path).sampling().temperature == 0  # 0 stays greedy


@pytest.mark.parametrize(
    "edit, key",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": "0.9"}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"pad_token_id": "<|endoftext|>"}, "pad_token_id"),
        ({"eos_token_id": "<|im_end|>"}, "eos_token_id"),
        ({"eos_token_id": [151645, -1]}, "eos_token_id"),
        ({"eos_token_id": [151645, True]}, "eos_token_id"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, edit, key):
    path = _write(tmp_path, {**QWEN3_GENERATION, **edit})  # json.dumps writes NaN / Infinity, which json reads back
    with pytest.raises(ValueError) as e:
        GenerationConfig.from_pretrained(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and re.search(rf"\b{key}\b", message), message


def test_unused_values_are_checked_too(tmp_path):
    """do_sample false: the sampling values are not used, but a broken file is still a broken file."""
    _write(tmp_path, {"do_sample": False, "temperature": -1})
    with pytest.raises(ValueError, match="temperature = -1"):
        GenerationConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=math.nan), dict(temperature=math.inf),
                                 dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=math.nan)])
def test_sampling_params_apply_the_same_rules(bad):
    (key,) = bad
    with pytest.raises(ValueError, match=rf"^{key} = "):
        SamplingParams(**bad)


def test_the_processor_reads_it_once_and_keeps_it(tiny_checkpoint_copy, monkeypatch):
    directory = tiny_checkpoint_copy
    _write(directory, {**QWEN3_GENERATION, "eos_token_id": [151645]})
    reads = []
    original = GenerationConfig.from_pretrained.__func__
    monkeypatch.setattr(GenerationConfig, "from_pretrained",
                        classmethod(lambda cls, d: reads.append(d) or original(cls, d)))
    processor = R4BProcessor.from_pretrained(directory)
    assert len(reads) == 1
    assert processor.generation_config.sampling() == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    assert processor.eos_token_ids == [151645]
    _write(directory, {**QWEN3_GENERATION, "top_p": 2})
    with pytest.raises(ValueError, match=re.escape(f"{directory / 'generation_config.json'}: top_p = 2")):
        R4BProcessor.from_pretrained(directory)
