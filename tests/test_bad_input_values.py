"""What bad values, files, flags and devices get (issue 11 points 3, 5, 8, 9, 10, 11): one clear error
naming the value, file, key, flag or device, raised before the weights load where it can be, and never
silently wrong output (non-finite weights or logits, wrong stored dtypes). Each test fails on the code
before its fix: the old behaviour is named in its docstring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r4b_core.cli import main
from r4b_core.devices import check_device
from r4b_core.generation.generate import NonFiniteLogitsError, generate
from r4b_core.generation_config import SamplingParams
from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_weights import resolve_checkpoint
from r4b_weights.errors import NonFiniteTensorError, TensorDtypeError

from cli_errors import err_lines, one_error, usage_error  # tests/cli_errors.py


# ---------------------------------------------------------------------------------------------
# 3. non-finite sampling values, 10. seeds


@pytest.mark.parametrize("kwargs", [dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan),
                                    dict(temperature=-1.0), dict(seed=10**23), dict(seed=-1)])
def test_sampling_params_refuse_bad_values(kwargs):
    """Before: temperature nan sampled "!!!!"; seed 10**23 failed in torch ("Overflow when unpacking long long")."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} = "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
                                         ("--seed", str(10**23))])
def test_generate_refuses_bad_sampling_flags_before_anything_loads(capsys, tmp_path, flag, value):
    line = usage_error(capsys, ["generate", "--prompt", "hi", "--model", str(tmp_path / "never-read"), flag, value])
    assert f"argument {flag}" in line and value in line


def test_seed_flags_are_checked_everywhere(capsys, tmp_path):
    assert "argument --seed" in usage_error(capsys, ["make-synthetic", str(tmp_path / "x"), "--seed", str(2**64)])
    assert "argument --seed" in usage_error(capsys, ["inspect", "--preset", "tiny", "--seed", str(10**23)])
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# 5. non-finite weights and logits, 9. wrong stored dtypes


def rewrite_tensor(directory: Path, name: str, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path), metadata={"format": "pt"})


LAYERNORM = "model.language_model.layers.0.input_layernorm.weight"


def test_non_finite_weights_are_reported_by_name_and_file(tiny_checkpoint_copy, capsys):
    """Before: NaN weights loaded silently; `r4b inspect --load` printed a forward of NaNs."""
    def poison(t):
        t = t.clone()
        t[3] = math.nan
        t[5] = math.inf
        return t

    rewrite_tensor(tiny_checkpoint_copy, LAYERNORM, poison)
    R4BForConditionalGeneration.from_pretrained(tiny_checkpoint_copy)  # not checked unless asked
    with pytest.raises(NonFiniteTensorError, match=rf"'{LAYERNORM}' in .*model.safetensors .*1 NaN and 1 Inf .*index 3"):
        R4BForConditionalGeneration.from_pretrained(tiny_checkpoint_copy, check_finite=True)
    assert main(["inspect", str(tiny_checkpoint_copy), "--load"]) == 1
    assert LAYERNORM in err_lines(capsys)[-1]


def test_non_finite_logits_stop_generation_at_their_step(tiny_checkpoint):
    """Before: NaN logits were sampled (argmax of NaN) and generation went on printing noise."""
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    prompt = torch.tensor([[151644, 100, 200, 300]])
    first = generate(model, prompt, max_new_tokens=1).tokens[0][0]
    assert first not in prompt[0].tolist()
    with torch.no_grad():
        model.language_model.model.embed_tokens.weight[first] = math.nan  # NaN once the first token is fed back
    with pytest.raises(NonFiniteLogitsError, match="generation step 1 "):
        generate(model, prompt, max_new_tokens=4)


def test_a_tensor_stored_as_int_or_bool_is_named_before_any_data_is_read(tiny_checkpoint_copy, monkeypatch):
    """Before: RuntimeError "Only Tensors of floating point ... can require gradients", naming nothing."""
    import r4b_weights.loader as loader

    rewrite_tensor(tiny_checkpoint_copy, LAYERNORM, lambda t: t.to(torch.int32))
    rewrite_tensor(tiny_checkpoint_copy, "model.image_newline", lambda t: t > 0)

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read before the dtype check")

    monkeypatch.setattr(loader, "iter_tensors", no_reads)
    with pytest.raises(TensorDtypeError) as e:
        R4BForConditionalGeneration.from_pretrained(tiny_checkpoint_copy)
    message = str(e.value)
    assert f"'{LAYERNORM}' in model.safetensors is stored as I32, expected a floating-point dtype" in message
    assert "'model.image_newline' in model.safetensors is stored as BOOL" in message


# ---------------------------------------------------------------------------------------------
# 8. devices this torch does not have


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "device cuda is not available"),
                                             ("cuda:7", "device cuda:7 is not available"),
                                             ("tpu", "device 'tpu' is not a torch device"),
                                             ("meta", "device meta holds no data")])
def test_unusable_devices_are_one_error_naming_them(device, message, tiny_checkpoint, capsys, monkeypatch):
    """Before: AssertionError "Torch not compiled with CUDA enabled" (a traceback) from generate, bench, parity
    and from_pretrained(device="cuda"); `--device meta` crashed in the forward."""
    import r4b_weights.loader as loader
    from r4b_core.models.qwen3 import Qwen3ForCausalLM

    def nothing_read(*args, **kwargs):
        raise AssertionError("the checkpoint was opened before the device was checked")

    monkeypatch.setattr(loader, "open_checkpoint", nothing_read)
    with pytest.raises(ValueError, match=message + ".*cpu"):
        check_device(device)
    for cls in (R4BForConditionalGeneration, Qwen3ForCausalLM):
        with pytest.raises(ValueError, match=message):
            cls.from_pretrained(tiny_checkpoint, device=device)
    for argv in (["generate", "--prompt", "hi"], ["bench"], ["parity"]):
        assert main([*argv, "--model", str(tiny_checkpoint), "--device", device]) == 1
        assert "--" + message in one_error(capsys)


# ---------------------------------------------------------------------------------------------
# 10. files, keys and flags named


def test_generation_config_with_a_wrongly_typed_value_names_file_and_key(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ValueError, match=r"generation_config.json: key 'temperature' = 'hot'"):
        R4BProcessor.from_pretrained(tiny_checkpoint_copy)


def test_config_json_that_is_not_utf8_names_the_file(tiny_checkpoint_copy, capsys):
    (tiny_checkpoint_copy / "config.json").write_bytes(b"\xff\xfe{\x00}")
    assert main(["inspect", str(tiny_checkpoint_copy)]) == 1
    assert f"{tiny_checkpoint_copy / 'config.json'}: not UTF-8" in one_error(capsys)


@pytest.mark.parametrize("argv, flag", [
    (["bench", "--repeats", "0"], "--repeats"),
    (["parity", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["make-synthetic", "DIR", "--max-shard-gb", "nan"], "--max-shard-gb"),
    (["make-synthetic", "DIR", "--max-shard-gb", "inf"], "--max-shard-gb"),
])
def test_flags_out_of_range_are_named(argv, flag, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "DIR" else a for a in argv]
    assert f"argument {flag}" in usage_error(capsys, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_shard_gb_must_be_positive(value, tmp_path, capsys):
    assert main(["make-synthetic", str(tmp_path / "out"), "--max-shard-gb", value]) == 2
    assert "--max-shard-gb must be positive" in one_error(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 11. a mistyped local path


def test_a_mistyped_local_path_says_no_such_directory_either(monkeypatch, tmp_path):
    """Before: only the hub's "Name or service not known", as if the user had meant a hub id."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/ckpt: there is no local directory 'runs/ckpt' \(from "
                                                r".*\), and as a hub id .* could not be downloaded"):
        resolve_checkpoint("runs/ckpt")
