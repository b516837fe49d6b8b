"""Load checkpoint tensors, strictly, into a model the caller built (normally on the meta device).

This module never imports model classes: it reads the layout it needs from ``model.config`` (an
``R4BConfig`` or a ``TextConfig``) and the model's own ``state_dict()``. The model classes' own
``from_pretrained`` are thin calls into it:

    directory, config_path, raw = open_checkpoint(path_or_repo, revision)
    config = R4BConfig.from_hf_dict(raw, source=str(config_path))
    with torch.device("meta"):
        model = R4BForConditionalGeneration(config)
    load_weights(model, directory, config_path, raw, dtype, device)   # the layout from model.config

Order of work, so that a bad checkpoint never yields a half-loaded model:
1. find the safetensors files (index, shards) and read every header (names, shapes; no data);
2. map HF names to ours through the one table in ``names.py``;
3. check the config against the tensors, then missing / unexpected / mis-shaped tensors and stored
   dtypes of the wrong kind (an int32 or bool tensor where the model holds a float), and raise one
   error naming the HF tensor, its file and both shapes (or dtypes);
4. only then read the tensors (mmap, one at a time), cast each to the requested dtype, and
   ``load_state_dict(strict=True, assign=True)``; tie lm_head when the config says so.
   With ``check_finite=True`` each tensor is checked for NaN / Inf as it is read.
The device is checked (r4b_core/devices.py) before step 1.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig, TextConfig, read_config_json
from r4b_core.devices import check_device
from r4b_weights.config_checks import (
    ConfigCheck,
    LayerCountRule,
    check_config,
    layer_count_problems,
    layer_count_rules,
    r4b_config_checks,
    text_config_checks,
)
from r4b_weights.errors import (
    ConfigMismatchError,
    CorruptCheckpointError,
    MissingTensorError,
    NonFiniteTensorError,
    ShapeMismatchError,
    TensorDtypeError,
    UnexpectedTensorError,
    name_list,
)
from r4b_weights.hub import resolve_checkpoint
from r4b_weights.names import (
    QWEN3,
    R4B,
    UnknownTensorName,
    full_to_text,
    hf_to_ours,
    ours_to_hf,
    text_to_full,
)
from r4b_weights.safetensors_io import (
    TensorInfo,
    find_weight_files,
    iter_tensors,
    read_headers,
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str, raw_config: dict | None = None) -> torch.dtype:
    """A torch dtype from a dtype, a name ('bfloat16', ...), or 'auto' (config.json's dtype, else fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        raw_config = raw_config or {}
        text = raw_config.get("text_config") or {}
        name = (raw_config.get("dtype") or raw_config.get("torch_dtype")
                or text.get("dtype") or text.get("torch_dtype") or "float32")
        return resolve_dtype(name)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of float32, bfloat16, float16 or 'auto'.")
    return DTYPES[dtype]


def check_layer_counts(directory: str | Path, config: R4BConfig | TextConfig, config_path: str | Path,
                       raw: dict) -> None:
    """The config's layer counts against the checkpoint's tensor names (safetensors headers only), run by
    ``from_pretrained`` BEFORE the model is built: a config.json that asks for 100000 layers must be refused
    in milliseconds, not after minutes and gigabytes of building them on the meta device."""
    files, index = find_weight_files(Path(directory))
    names = []
    for hf in read_headers(files, index):
        try:
            ours = hf_to_ours(hf)
        except UnknownTensorName:
            continue  # reported by the full load
        if ours is not None:
            names.append(ours)
    problems = layer_count_problems(layer_count_rules(config, "text_config" in raw, full_names=True), names)
    if problems:
        raise ConfigMismatchError(f"{config_path} disagrees with the checkpoint's tensors: " + "; ".join(problems) + ".")


class _LoadProgress:
    """Loading progress on stderr: a progress bar on a terminal; otherwise (a log file, a pipe, CI) one plain
    line at the start and one at the end, since a bar redrawn with carriage returns is unreadable there."""

    def __init__(self, total: int, label: str, started: float | None = None) -> None:
        # started: when the caller's load began (time.perf_counter()), so the closing line's figure is the
        # whole load (config, meta build, checks, reads) and the only load time a command prints
        self.total, self.label = total, label
        self.start = time.perf_counter() if started is None else started
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm  # a dependency of huggingface_hub

            self.bar = tqdm(total=total, desc=f"loading {label}", unit="tensor", leave=False)
        else:
            print(f"loading {label}: {total} tensors ...", file=sys.stderr, flush=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"loaded {self.label}: {self.total} tensors in {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names; F8_* are floating too


def _stored_as_float(dtype: str) -> bool:
    return dtype in _FLOAT_DTYPES or dtype.startswith("F8")


def _check_dtypes(expected: dict[str, torch.dtype], hf_name: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    """Every tensor's stored dtype is of the kind the model holds there (float vs integer / bool); from the
    headers, so before any tensor data is read."""
    wrong = []
    for name, want in expected.items():
        info = infos[hf_name[name]]
        if want.is_floating_point != _stored_as_float(info.dtype):
            kind = "a floating-point dtype (F32, BF16, F16)" if want.is_floating_point else f"{want}"
            wrong.append(f"'{hf_name[name]}' in {info.file.name} is stored as {info.dtype}, expected {kind}")
    if wrong:
        more = f" ... and {len(wrong) - 8} more" if len(wrong) > 8 else ""
        raise TensorDtypeError(f"{info.file.parent}: wrong tensor dtype(s): {'; '.join(wrong[:8])}{more}. The file "
                               "was written with the wrong dtype (or is not this model's checkpoint); re-export it.")


def _check_finite(name: str, info: TensorInfo, tensor: torch.Tensor) -> None:
    """``check_finite``: NaN / Inf in a floating tensor is an error naming it (the stored dtype and the dtype
    it was cast to, since a cast to float16 can overflow)."""
    if not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan, n_inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    first = int((~finite).flatten().nonzero()[0])
    cast = " (after the cast to float16)" if tensor.dtype == torch.float16 and info.dtype != "F16" else ""
    raise NonFiniteTensorError(
        f"tensor '{name}' in {info.file} ({info.dtype}, shape {list(info.shape)}) holds {n_nan} NaN and {n_inf} Inf "
        f"value(s){cast}, the first at flat index {first}; the checkpoint is corrupt or was saved after training "
        "diverged" + (", or the values overflow float16: load it in float32 or bfloat16" if cast else "") + "."
    )


def load_checkpoint_into(
    model: nn.Module,
    directory: Path,
    to_model_name: Callable[[str], str | None],
    to_hf_name: Callable[[str], str],
    dtype: torch.dtype,
    device: torch.device | str,
    tied: dict[str, str],
    config_checks: list[ConfigCheck],
    layer_counts: list[LayerCountRule],
    config_path: str,
    progress: bool | float = False,
    check_finite: bool = False,
) -> None:
    """Fill ``model`` (normally built on the meta device) from the safetensors in ``directory``; see the
    module docstring. Every check runs before a tensor is read; on return every parameter and buffer
    is a real tensor (the loaded ones on ``device``) and tied parameters are one ``nn.Parameter``.

    to_model_name: HF name -> model state-dict name (None: dropped by an explicit rule; raises
    UnknownTensorName for names no rule covers). to_hf_name: the inverse, for messages.
    tied: model name -> the model name it shares storage with (not read from the checkpoint).
    layer_counts: (regex with the layer index as group 1, config key, expected count).
    progress: show a progress bar (on stderr) while tensors are read (plain lines when stderr is not a terminal);
    a float is the time.perf_counter() at which the caller's load began, which the closing line counts from.
    check_finite: check every floating tensor for NaN / Inf as it is read (NonFiniteTensorError naming the
    first, by HF name and file); it costs one pass over the weights.
    """
    files, index = find_weight_files(directory)
    infos = read_headers(files, index)  # step 1: headers only
    hf_name, unexpected = _map_names(infos, to_model_name, tied, directory)  # step 2
    shapes = {name: infos[hf].shape for name, hf in hf_name.items()}
    check_config(config_checks, layer_counts, shapes, hf_name, infos, config_path)  # step 3
    where = f"{directory} ({', '.join(f.name for f in files)})"
    _check_tensors_fit(model, tied, hf_name, unexpected, infos, to_hf_name, where)
    state = _read_tensors(hf_name, infos, dtype, device, check_finite,  # step 4
                          _LoadProgress(len(hf_name), directory.name,
                                        progress if isinstance(progress, float) else None) if progress else None)
    _assign(model, state, tied)


def _map_names(infos: dict[str, TensorInfo], to_model_name: Callable[[str], str | None], tied: dict[str, str],
               directory: Path) -> tuple[dict[str, str], list[str]]:
    """({model name: HF name} of the tensors to read, [HF names no rule knows]). Dropped names and stored
    copies of tied weights are left out (ignored, as in transformers); two HF spellings of one weight are an
    error."""
    hf_name: dict[str, str] = {}
    unexpected: list[str] = []
    for hf in infos:
        try:
            name = to_model_name(hf)
        except UnknownTensorName:
            unexpected.append(hf)
            continue
        if name is None or name in tied:
            continue
        if name in hf_name:
            raise CorruptCheckpointError(
                f"{directory}: tensors '{hf_name[name]}' and '{hf}' are two spellings of the same weight; keep one."
            )
        hf_name[name] = hf
    return hf_name, unexpected


def _check_tensors_fit(model: nn.Module, tied: dict[str, str], hf_name: dict[str, str], unexpected: list[str],
                       infos: dict[str, TensorInfo], to_hf_name: Callable[[str], str], where: str) -> None:
    """The checkpoint's tensors against the model's state dict, from the headers: none missing, none without
    a place, every shape and dtype kind right, and no meta buffer that nothing would fill; one error naming
    the HF tensors, their files and both shapes (or dtypes)."""
    model_state = {n: t for n, t in model.state_dict().items() if n not in tied}
    expected = {n: tuple(t.shape) for n, t in model_state.items()}
    missing = [n for n in expected if n not in hf_name]
    unexpected = unexpected + [hf for name, hf in hf_name.items() if name not in expected]
    if missing:
        raise MissingTensorError(
            f"{where} lacks tensor(s) the model needs: {name_list(to_hf_name(n) for n in missing)}. "
            "Is the checkpoint complete and does config.json describe it?"
        )
    if unexpected:
        detail = ", ".join(f"'{hf}' (in {infos[hf].file.name})" for hf in sorted(unexpected)[:8])
        more = f" ... and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise UnexpectedTensorError(
            f"{where} holds tensor(s) this model has no place for: {detail}{more}. "
            "Is this checkpoint for a different architecture or config?"
        )
    wrong = [(n, want, infos[hf_name[n]].shape) for n, want in expected.items() if infos[hf_name[n]].shape != want]
    if wrong:
        detail = "; ".join(
            f"'{hf_name[n]}' in {infos[hf_name[n]].file.name} has shape {list(got)}, expected {list(want)}"
            for n, want, got in wrong[:8]
        )
        raise ShapeMismatchError(f"{where}: wrong tensor shape(s): {detail}.")
    _check_dtypes({n: t.dtype for n, t in model_state.items()}, hf_name, infos)
    persistent = set(model.state_dict())
    stranded = [n for n, b in model.named_buffers() if b.is_meta and n not in persistent]
    if stranded:
        raise ValueError(
            f"{type(model).__name__} has non-persistent buffer(s) on the meta device that no checkpoint fills: "
            f"{name_list(stranded)}; create them on a real device in the module's __init__ (as the RoPE table is)."
        )


def _read_tensors(hf_name: dict[str, str], infos: dict[str, TensorInfo], dtype: torch.dtype,
                  device: torch.device | str, check_finite: bool,
                  bar: _LoadProgress | None) -> dict[str, torch.Tensor]:
    """{model name: tensor} read file by file (mmap, one tensor at a time), cast to ``dtype`` on ``device``."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for hf in hf_name.values():
        by_file[infos[hf].file].append(hf)
    model_name = {hf: name for name, hf in hf_name.items()}
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        for hf, tensor in iter_tensors(path, names, dtype, device):
            if check_finite:
                _check_finite(hf, infos[hf], tensor)
            state[model_name[hf]] = tensor
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return state


def _assign(model: nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """``load_state_dict(strict=True, assign=True)``, then each tied parameter made one ``nn.Parameter``."""
    for name, source in tied.items():
        state[name] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    for name, source in tied.items():  # assign=True wraps each entry in its own Parameter: share one again
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))


def open_checkpoint(path_or_repo: str | Path, revision: str | None = None) -> tuple[Path, Path, dict]:
    """(local directory, its config.json path, config.json as a dict) for a local directory or a hub id.

    A directory without safetensors (missing, or pickle weights only) is refused here, before any
    model is built.
    """
    directory = resolve_checkpoint(path_or_repo, revision)
    find_weight_files(directory)
    config_path, raw = read_config_json(directory)
    return directory, config_path, raw


def load_weights(
    model: nn.Module,
    directory: str | Path,
    config_path: str | Path,
    raw: dict,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool | float = False,
    check_finite: bool = False,
) -> nn.Module:
    """Load a checkpoint into ``model`` (normally built on the meta device); returns ``model``.

    What is read follows ``model.config``, the config parsed from ``config_path``:
    - an ``R4BConfig``: the full model's names (``language_model.*``, ``vision_tower.*``,
      ``multi_modal_projector.*``, ``image_newline``) from a checkpoint in R-4B's layout (or the legacy
      LLaVA spelling);
    - a ``TextConfig``: a Qwen3 causal LM (``model.*`` decoder, ``lm_head``) from a Qwen3 checkpoint, or
      from the text side of an R-4B one (``raw`` tells them apart).
    ``raw`` is that config.json as read (also the dtype for ``dtype='auto'``).
    dtype: a torch dtype, 'float32' / 'bfloat16' / 'float16', or 'auto' (config.json's dtype).
    device: checked first (r4b_core/devices.py), before any tensor is read. progress, check_finite: see
    ``load_checkpoint_into``. TypeError when ``model.config`` is neither.
    """
    device = check_device(device)
    config = getattr(model, "config", None)
    if isinstance(config, R4BConfig):
        tied = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"} if config.tie_lm_head else {}
        to_model_name, to_hf_name = hf_to_ours, lambda name: ours_to_hf(name, R4B)
        checks, counts = r4b_config_checks(config), layer_count_rules(config, True, full_names=True)
    elif isinstance(config, TextConfig):
        is_r4b = "text_config" in raw

        def to_model_name(hf: str) -> str | None:
            ours = hf_to_ours(hf)
            return None if ours is None else full_to_text(ours)  # vision side: not part of the text model

        def to_hf_name(name: str) -> str:
            return ours_to_hf(text_to_full(name), R4B if is_r4b else QWEN3)

        tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
        checks = text_config_checks(config, "model.", "text_config" if is_r4b else "")
        counts = layer_count_rules(config, is_r4b, full_names=False)
    else:
        raise TypeError(f"load_weights: model.config is a {type(config).__name__}; expected the R4BConfig or "
                        f"TextConfig parsed from {config_path}.")
    load_checkpoint_into(
        model, Path(directory), to_model_name, to_hf_name, resolve_dtype(dtype, raw), device, tied,
        config_checks=checks, layer_counts=counts, config_path=str(config_path), progress=progress,
        check_finite=check_finite,
    )
    return model.to(device)
