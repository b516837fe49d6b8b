"""The one JSON reader: every failure names the file (missing, a directory, not UTF-8, not JSON, not an
object), in read_json itself and in each of the five places that read a checkpoint's JSON files."""

from __future__ import annotations

import json

import pytest

from r4b_core.processing.chat_template import find_chat_template
from r4b_core.config import ConfigError, R4BConfig, preset
from r4b_core.generation_config import GenerationConfig
from r4b_core.processing.image_processing import ImageProcessorConfig
from r4b_core.json_io import JSONFileError, read_json, read_json_if_present
from r4b_weights.errors import CorruptCheckpointError
from r4b_weights.safetensors_io import INDEX_NAME, find_weight_files

NOT_UTF8 = b'{"name": "caf\xe9"}'  # Latin-1 bytes: 0xE9 is not valid UTF-8 here


def test_reads_an_object(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"x": [1, 2.5, None], "é": "ü"}), encoding="utf-8")
    assert read_json(path) == {"x": [1, 2.5, None], "é": "ü"}
    assert read_json_if_present(path) == {"x": [1, 2.5, None], "é": "ü"}
    assert read_json_if_present(tmp_path / "absent.json") is None


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_json(tmp_path / "absent.json", what="the model config")
    assert str(tmp_path / "absent.json") in str(e.value) and "the model config" in str(e.value)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_json(tmp_path / "dir.json")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_json_if_present(tmp_path / "dir.json")


@pytest.mark.parametrize(
    "content, needle",
    [
        (NOT_UTF8, "not UTF-8 text (byte 13"),
        (b'{"a": 1,,}', "not valid JSON (line 1, column 9"),
        (b'{\n  "a": 1\n  "b": 2\n}', "not valid JSON (line 3, column 3"),
        (b"", "not valid JSON (line 1, column 1"),
        (b"[1, 2]", "expected a JSON object at the top level; got an array"),
        (b'"text"', "got a string"),
        (b"null", "got null"),
        (b"3", "got a number"),
    ],
)
def test_bad_content_names_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(JSONFileError) as e:
        read_json(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="bad.json"):  # the caller's error class
        read_json(path, error=ConfigError)


# ---------------------------------------------------------------------------------------------
# the five readers: config.json, preprocessor_config.json, generation_config.json, chat template, shard index


def _read_config(d):
    return R4BConfig.from_pretrained(d)


def _read_preprocessor(d):
    return ImageProcessorConfig.from_pretrained(d)


def _read_generation(d):
    return GenerationConfig.from_pretrained(d)


def _read_chat_template(d):
    return find_chat_template(d)


def _read_index(d):
    return find_weight_files(d)


READERS = [
    ("config.json", _read_config, ConfigError),
    ("preprocessor_config.json", _read_preprocessor, ValueError),
    ("generation_config.json", _read_generation, ValueError),
    ("chat_template.json", _read_chat_template, ValueError),
    ("tokenizer_config.json", _read_chat_template, ValueError),
    (INDEX_NAME, _read_index, CorruptCheckpointError),
]


@pytest.mark.parametrize("name, read, error", READERS)
@pytest.mark.parametrize("content, needle", [(NOT_UTF8, "not UTF-8"), (b"{oops", "not valid JSON"),
                                             (b"[]", "JSON object")])
def test_each_reader_names_its_file(tmp_path, name, read, error, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error) as e:
        read(tmp_path)
    assert str(tmp_path / name) in str(e.value) and needle in str(e.value), str(e.value)


def test_valid_files_still_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    assert R4BConfig.from_pretrained(tmp_path) == preset("tiny")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert find_chat_template(tmp_path) == ("{{ messages }}", tmp_path / "chat_template.json")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()  # absent: empty
