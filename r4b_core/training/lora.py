"""LoRA: low-rank adapters on chosen Linears, applied from outside the model.

    y = x W^T + b  +  (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r]

A starts as ``nn.Linear``'s own init (Kaiming uniform, a = sqrt(5)), B as zeros, so an adapted model
starts equal to the base model. ``LoRALinear`` subclasses ``nn.Linear`` and keeps the base ``weight`` and
``bias`` Parameters (same objects, same names), adding ``lora_A`` and ``lora_B`` next to them:

    language_model.model.layers.0.self_attn.q_proj.weight     the base weight (frozen)
    language_model.model.layers.0.self_attn.q_proj.lora_A     [r, in]
    language_model.model.layers.0.self_attn.q_proj.lora_B     [out, r]

so the base model's state-dict names, the weight table and FSDP2's per-block units are unchanged.

    apply_lora(model, rank=8, alpha=16)     # default: q/k/v/o of every decoder block; only adapters train
    save_lora(model, "adapter.safetensors") # adapters only (+ rank, alpha, module names as metadata)
    load_lora(model, "adapter.safetensors") # onto a base model (applies the adapters first if needed)
    merge_lora(model)                       # W += (alpha / r) B A; plain nn.Linear again, ready to export

Targets are regular expressions matched against whole module names (wrapper parts such as
``_checkpoint_wrapped_module`` ignored), e.g. ``r"vision_tower\\.encoder\\.layers\\.\\d+\\.mlp\\.fc[12]"``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.models.hooks import canonical_name
from r4b_weights.atomic_file import replacing

DEFAULT_TARGETS = (r"language_model\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",)
ADAPTER_FORMAT = "r4b-lora-1"


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``scaling * B @ A`` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}.")
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its weight
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    dtype: torch.dtype | None = None) -> "LoRALinear":
        """A LoRALinear around ``linear``'s own weight and bias Parameters (no copy)."""
        weight = linear.weight
        lora = cls(linear.in_features, linear.out_features, linear.bias is not None, rank=rank, alpha=alpha,
                   dropout=dropout, device="meta", dtype=weight.dtype)
        lora.weight, lora.bias = weight, linear.bias
        lora_dtype = dtype or weight.dtype
        lora.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=weight.device, dtype=lora_dtype))
        lora.lora_B = nn.Parameter(torch.empty(linear.out_features, rank, device=weight.device, dtype=lora_dtype))
        lora.reset_lora_parameters()
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (update * self.scaling).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, computed in fp32, in W's dtype."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return (self.weight.detach().float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of ``model`` by their real (possibly wrapped) module names."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS, freeze_base: bool = True,
               dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every ``nn.Linear`` whose (canonical) module name fully matches one of ``targets`` with a
    LoRALinear; with ``freeze_base`` only the adapters stay trainable. ``dtype``: the adapters' dtype
    (default: the base weight's). Returns the wrapped module names (canonical). Apply before FSDP2."""
    patterns = [re.compile(t) for t in targets]
    chosen = []
    for name, module in model.named_modules():
        plain = canonical_name(name)
        if not any(p.fullmatch(plain) for p in patterns):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: {plain} already has a LoRA adapter.")
        if type(module) is not nn.Linear:
            raise TypeError(f"apply_lora: {plain} is a {type(module).__name__}, not an nn.Linear.")
        chosen.append((name, plain, module))
    if not chosen:
        raise ValueError(f"apply_lora: no nn.Linear matches the targets {list(targets)}.")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, _, module in chosen:
        _replace(model, name, LoRALinear.from_linear(module, rank, alpha, dropout, dtype))
    return [plain for _, plain, _ in chosen]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += alpha / r * B @ A``) and put a plain ``nn.Linear``
    (holding the same weight Parameter, now updated) back in its place. Returns the number merged.
    The merged model computes the same function up to float rounding; its ``requires_grad`` flags are
    those of the base weights (frozen after ``apply_lora``)."""
    modules = lora_modules(model)
    for name, m in modules.items():
        if type(m.weight).__name__ == "DTensor":
            raise RuntimeError("merge_lora: the model is sharded (FSDP2); gather a full state dict first.")
        m.weight.copy_(m.merged_weight())
        plain = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _replace(model, name, plain)
    return len(modules)


# ---------------------------------------------------------------------------------------------
# adapter-only files


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, by canonical names (``...q_proj.lora_A`` / ``...q_proj.lora_B``)."""
    out = {}
    for name, m in lora_modules(model).items():
        plain = canonical_name(name)
        out[f"{plain}.lora_A"], out[f"{plain}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters to a safetensors file, with rank, alpha and the module names as metadata."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_lora: the model has no LoRA adapters.")
    first = next(iter(modules.values()))
    metadata = {"format": ADAPTER_FORMAT, "rank": str(first.rank), "alpha": repr(first.alpha),
                "modules": json.dumps(sorted(canonical_name(n) for n in modules))}
    if any(m.rank != first.rank or m.alpha != first.alpha for m in modules.values()):
        raise ValueError("save_lora: adapters with different ranks or alphas are not supported in one file.")
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as partial:  # written whole, then renamed (umask's mode): a crash keeps the old file
        save_file(tensors, str(partial), metadata=metadata)
    return path


@torch.no_grad()
def load_lora(model: nn.Module, path: str | Path, dropout: float = 0.0) -> nn.Module:
    """Load an adapter file onto ``model``. A model without adapters gets them first (``apply_lora`` on
    exactly the modules the file names, with its rank and alpha). Missing, extra or mis-shaped adapter
    tensors are errors that name them."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not an r4b LoRA adapter file (metadata format {metadata.get('format')!r}).")
    if not lora_modules(model):
        names = json.loads(metadata["modules"])
        apply_lora(model, rank=int(metadata["rank"]), alpha=float(metadata["alpha"]), dropout=dropout,
                   targets=[re.escape(n) for n in names])
    params = {}
    for name, m in lora_modules(model).items():
        plain = canonical_name(name)
        params[f"{plain}.lora_A"], params[f"{plain}.lora_B"] = m.lora_A, m.lora_B
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"{path}: adapters missing from the file {missing[:4]}, in the file but not the model "
                       f"{unexpected[:4]}.")
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"{path}: {key} has shape {list(tensors[key].shape)}, the model's is {list(param.shape)}.")
        param.copy_(tensors[key])
    return model
