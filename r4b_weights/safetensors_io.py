"""Finding, inspecting, reading and writing (sharded) safetensors files.

Reading goes through ``safe_open``, which memory-maps the file: headers are inspected first (names,
shapes, dtypes) so that every check runs before a single tensor is read, and tensors are then read
one at a time. Pickle files are never opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r4b_core.json_io import read_json
from r4b_weights.errors import (
    CorruptCheckpointError,
    MissingShardError,
    PickleCheckpointError,
    name_list,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"


def find_weight_files(directory: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a checkpoint directory and its shard index (or None).

    Uses ``model.safetensors.index.json`` when present (every shard it lists must exist), else
    ``model.safetensors``, else every ``*.safetensors`` file. A directory holding only pickle
    weights is refused.
    """
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        if not weight_map:  # e.g. a stale index beside model.safetensors: it would win and load nothing
            raise CorruptCheckpointError(
                f"{index}: its 'weight_map' names no tensors, so the checkpoint would load nothing"
                + (f" (r4b reads the index, not {SINGLE_NAME} beside it; remove the stale index)"
                   if (directory / SINGLE_NAME).is_file() else "") + ".")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise MissingShardError(
                f"{index} lists shard file(s) {name_list(missing)} that are not in {directory}. "
                "Download the missing shards (or the whole checkpoint) again."
            )
        return [directory / s for s in shards], index
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME], None
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleCheckpointError(
            f"{directory} holds only pickle weights ({name_list(pickles)}); r4b loads safetensors only and never "
            "unpickles files (unpickling can run arbitrary code). Convert them once with a tool you trust, e.g. "
            "transformers' save_pretrained(..., safe_serialization=True)."
        )
    raise FileNotFoundError(f"{directory}: no weights found (expected {SINGLE_NAME} or {INDEX_NAME}).")


def _read_index(index: Path) -> dict[str, str]:
    data = read_json(index, what="the shard index", error=CorruptCheckpointError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files.")
    return weight_map


def read_headers(files: list[Path], index: Path | None = None) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) over all files, without reading tensor data."""
    infos: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in infos:
                        raise CorruptCheckpointError(
                            f"tensor '{name}' is stored twice: in {infos[name].file.name} and in {path.name}."
                        )
                    infos[name] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise CorruptCheckpointError(
                f"{path}: not a readable safetensors file ({e}). The file is truncated or corrupt; download it again."
            ) from None
    if index is not None:
        weight_map = _read_index(index)
        listed_elsewhere = [n for n, info in infos.items() if weight_map.get(n) != info.file.name]
        absent = [n for n, shard in weight_map.items() if n not in infos]
        if listed_elsewhere or absent:
            detail = []
            if absent:
                detail.append(f"listed but not found in their shard: {name_list(absent)}")
            if listed_elsewhere:
                detail.append(f"found in a shard the index does not name for them: {name_list(listed_elsewhere)}")
            raise CorruptCheckpointError(f"{index} disagrees with the shard files; " + "; ".join(detail) + ".")
    return infos


def iter_tensors(path: Path, names: list[str], dtype: torch.dtype | None, device: torch.device | str):
    """Yield (name, tensor) for ``names`` of one file: read through the mmap, floating tensors cast to
    ``dtype``, then moved to ``device``. One tensor is materialised at a time."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield name, t.to(device)
    except SafetensorError as e:
        raise CorruptCheckpointError(f"{path}: cannot read its tensors ({e}); download the file again.") from None


def _shard_plan(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def existing_weight_files(directory: Path) -> list[str]:
    """Names of weight files (single file, shards, index) already in ``directory``."""
    names = [n for n in (SINGLE_NAME, INDEX_NAME) if (directory / n).exists()]
    return names + sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))


def _make_readable(path: Path) -> None:
    """safetensors writes 0600 files; give them the usual permissions (0644 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o644 & ~umask)


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[Path]:
    """Write ``tensors`` as model.safetensors, or as numbered shards plus an index above the threshold.

    ``directory`` must hold no weight files yet: this neither deletes nor overwrites any (a stale index would
    win over a new single file). Callers write into a fresh directory and rename it into place
    (``r4b_weights.output_dir``), which is what replaces an earlier checkpoint safely.
    """
    directory = Path(directory)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, (int, float)) or not max_shard_bytes > 0:
        raise ValueError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}.")
    directory.mkdir(parents=True, exist_ok=True)
    present = existing_weight_files(directory)
    if present:
        raise FileExistsError(f"{directory} already holds weight files ({', '.join(present[:4])}); write_safetensors "
                              "writes into a directory without any (it never deletes or overwrites them).")
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    plan = _shard_plan(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(plan) == 1:
        path = directory / SINGLE_NAME
        save_file(tensors, str(path), metadata=metadata)
        _make_readable(path)
        return [path]
    paths, weight_map = [], {}
    for i, names in enumerate(plan, start=1):
        path = directory / f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path), metadata=metadata)
        _make_readable(path)
        weight_map.update({n: path.name for n in names})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths
