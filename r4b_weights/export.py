"""Write a model back as an HF checkpoint: config.json plus (sharded) safetensors in the HF layout.

Any module is exported from its ``state_dict()`` and its ``config``; no model class is imported. The
config's type picks the layout: an ``R4BConfig`` gives R-4B's layout, a ``TextConfig`` a plain Qwen3
checkpoint (names through the one table in ``names.py``). Reloading what ``save_hf_checkpoint`` wrote gives bit-identical tensors. A tied lm_head is not
written (transformers does not store tied weights either).

With ``source_dir`` (the checkpoint the model came from, e.g. before fine-tuning) the files that are
not weights are copied too, so the directory is a complete checkpoint that transformers, vLLM and
``R4BProcessor`` read: tokenizer, processor, chat-template and generation-config files
(``SOURCE_FILES``) and every top-level ``*.py`` (remote code: the modules ``auto_map`` names).
``config.json`` is always written from the model's config, which keeps the source's unknown keys
(``auto_map``, ...).

Where it writes (``r4b_weights/output_dir.py``, the writer make-synthetic uses): every file goes into a
temporary directory beside ``directory`` that is renamed into place, so a crash or a full disk leaves the
previous contents as they were. ``directory`` must be new or empty; anything else (an earlier r4b output,
whose files its ``.r4b-manifest.json`` lists, or the user's files) is refused unless ``force=True``, so no run
replaces an earlier one's checkpoint unless told. With force, r4b's own earlier files are replaced (its stale
shards go) and the user's kept, never deleted, and a
user's file that would be read with the new checkpoint (``read_with_export``: weights, a shard index, a
tokenizer or chat template the export does not write itself) is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from r4b_core.config import R4BConfig, TextConfig
from r4b_weights.hub import CHECKPOINT_AUX_FILES
from r4b_weights.names import QWEN3, R4B, UnknownTensorName, ours_to_hf, text_to_full
from r4b_weights.output_dir import check_target, write_directory
from r4b_weights.safetensors_io import INDEX_NAME, PICKLE_SUFFIXES, write_safetensors

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

SOURCE_FILES = CHECKPOINT_AUX_FILES  # copied by ``source_dir=``


def source_file_names(source_dir: str | Path) -> list[str]:
    """The files ``copy_source_files`` takes from ``source_dir``: ``SOURCE_FILES`` present there, then ``*.py``."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source_dir {source_dir} is not a directory; pass the checkpoint directory the "
                                "model was loaded from (or None).")
    names = [n for n in SOURCE_FILES if (source_dir / n).is_file()]
    return names + sorted(p.name for p in source_dir.glob("*.py") if p.is_file())


def read_with_export(name: str) -> bool:
    """Whether a loader, transformers or the processor would read a file of this name beside an exported
    checkpoint (config, weights, shard index, tokenizer / processor / template files)."""
    return (name == "config.json" or name in CHECKPOINT_AUX_FILES or name == INDEX_NAME
            or name.endswith(".safetensors") or name.endswith(PICKLE_SUFFIXES))


def copy_source_files(source_dir: str | Path, directory: str | Path) -> list[Path]:
    """Copy ``SOURCE_FILES`` and every top-level ``*.py`` (remote code) from ``source_dir``; returns the copies."""
    source_dir, directory = Path(source_dir), Path(directory)
    copied = []
    for name in source_file_names(source_dir):
        target = directory / name
        if target.exists() and target.resolve() == (source_dir / name).resolve():
            continue  # saving over the source checkpoint
        shutil.copyfile(source_dir / name, target)
        copied.append(target)
    return copied


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names whose tensor was already seen under an earlier name (shared parameters)."""
    seen: set[int] = set()
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(name)
        seen.add(id(t))
    return tied


def save_hf_checkpoint(
    model: nn.Module, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    source_dir: str | Path | None = None, force: bool = False,
) -> list[Path]:
    """Save ``model`` to ``directory`` in its HF layout; returns the safetensors files written.

    The layout follows ``model.config``: an ``R4BConfig`` (e.g. ``R4BForConditionalGeneration``) is
    written in R-4B's layout (``model.language_model.*``, ``model.vision_tower.vision_model.*``,
    ``model.multi_modal_projector.*``, ``model.image_newline``, ``lm_head.*``); a ``TextConfig`` (e.g.
    ``Qwen3ForCausalLM``) as a plain Qwen3 checkpoint (``model.*``, ``lm_head.*``).
    Shards (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) are used when
    the tensors exceed ``max_shard_bytes``; with ``force`` an earlier r4b export in ``directory`` is replaced
    whole (its stale shards go). ``source_dir``: also copy the tokenizer / processor / template / generation /
    remote-code files from that checkpoint (see the module docstring). Wrapper parts in parameter names
    (activation-checkpoint, compile) never reach ``state_dict()``; merge LoRA adapters first
    (``r4b_core.training.lora.merge_lora``): their tensors have no HF name.

    ``directory`` must be new or empty; ``force=True`` writes into any other directory (an earlier export too), replacing only r4b's own files (and ``config.json`` / the copied source files, which it writes)
    and keeping the rest; a file it did not write that would be read with the checkpoint is refused
    (FileExistsError naming it). Written through a temporary directory: a failure leaves ``directory`` as it was.
    """
    tensors, hf_config = _hf_tensors_and_config(model)
    weight_names: list[str] = []

    def fill(staging: Path) -> None:
        weight_names.extend(p.name for p in _write_files(tensors, hf_config, staging, max_shard_bytes, source_dir))

    target = write_directory(directory, fill, force=force, what="an exported checkpoint",
                             keeps_out=export_keeps_out(source_dir))
    return [target / name for name in weight_names]


def export_keeps_out(source_dir: str | Path | None = None) -> Callable[[str], bool]:
    """The files of another writer that block an export with ``force`` (``read_with_export`` names the export
    does not write itself)."""
    replaced = {"config.json", *(source_file_names(source_dir) if source_dir is not None else [])}
    return lambda name: read_with_export(name) and name not in replaced


def check_export_target(directory: str | Path, source_dir: str | Path | None = None, force: bool = False) -> None:
    """The checks ``save_hf_checkpoint`` makes before writing, alone: for callers with expensive work before
    the export (a training run checks its ``--out`` before the first step). FileExistsError naming the problem."""
    check_target(Path(directory).expanduser(), force, export_keeps_out(source_dir), "an exported checkpoint")


def write_hf_files(model: nn.Module, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   source_dir: str | Path | None = None) -> list[Path]:
    """The files of ``save_hf_checkpoint`` written straight into ``directory``, which must hold no weight
    files yet (e.g. a caller's own staging directory, as make-synthetic's); no target checks, no rename."""
    tensors, hf_config = _hf_tensors_and_config(model)
    return _write_files(tensors, hf_config, Path(directory), max_shard_bytes, source_dir)


def _write_files(tensors: dict[str, torch.Tensor], hf_config: dict, directory: Path, max_shard_bytes: int,
                 source_dir: str | Path | None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = write_safetensors(tensors, directory, max_shard_bytes)
    if source_dir is not None:
        copy_source_files(source_dir, directory)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return written


def _hf_tensors_and_config(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's tensors under their HF names and its config.json dict (every check before any write)."""
    config = getattr(model, "config", None)
    if isinstance(config, R4BConfig):
        layout = R4B

        def hf_name(name: str) -> str:
            return ours_to_hf(name, R4B)
    elif isinstance(config, TextConfig):
        layout = QWEN3

        def hf_name(name: str) -> str:
            return ours_to_hf(text_to_full(name), QWEN3)
    else:
        raise TypeError(f"save_hf_checkpoint: {type(model).__name__}.config is a {type(config).__name__}; expected "
                        "an R4BConfig (R-4B layout) or a TextConfig (plain Qwen3 layout).")
    tied = _tied_names(model)
    state = model.state_dict()
    adapters = [n for n in state if n.endswith((".lora_A", ".lora_B"))]
    if adapters:
        raise ValueError(f"save_hf_checkpoint: the model holds LoRA adapters ({adapters[0]}, ...); fold them in with "
                         "r4b_core.training.lora.merge_lora(model) first (or save them alone with save_lora).")
    tensors = {}
    for name, t in state.items():
        if name in tied:
            continue
        try:
            tensors[hf_name(name)] = t
        except UnknownTensorName:
            raise ValueError(f"save_hf_checkpoint: {type(model).__name__} tensor '{name}' has no name in the {layout!r} "
                             "layout (r4b_weights/names.py); export only the model's own parameters.") from None
    if not tensors:
        raise ValueError(f"save_hf_checkpoint: {type(model).__name__} has no tensors to write.")
    hf_config = config.to_hf_dict()
    if layout == QWEN3:
        hf_config.setdefault("architectures", ["Qwen3ForCausalLM"])
    dtype = next(iter(tensors.values())).dtype
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in hf_config] or ["torch_dtype"]
    for key in dtype_keys:
        hf_config[key] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return tensors, hf_config
