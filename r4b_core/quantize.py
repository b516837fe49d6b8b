"""Faster linears for CPU decoding, swapped in from outside the model (the model code never changes).

Decoding one token is a chain of matrix-vector products (M = batch = 1..8 rows against every weight),
so its speed is the speed at which the weights stream from memory. Two replacements for
``nn.Linear``, applied to the language model after its weights are loaded:

- ``int8``: weight-only int8 with one scale per output channel (symmetric, round to nearest): 1 byte
  per weight instead of 2 (bf16) or 4 (fp32). Activations run in bfloat16 through
  ``aten._weight_int8pack_mm``; outputs are cast back to the input's dtype. Long inputs (prefill, more
  than ``INT8_KERNEL_MAX_ROWS`` rows) dequantize the weight to bf16 for the call and use a plain GEMM,
  which is compute-bound there anyway.
- ``bf16-prepacked``: the same bf16 weights, reordered once into oneDNN's blocked layout
  (``mkldnn._reorder_linear_weight``) and run with ``mkldnn._linear_pointwise``. On plain (unpacked)
  bf16 weights the same oneDNN call runs at about a third of that speed at M = 1 on the AVX-512 BF16
  CPU of BENCHMARKS.md; so does ``F.linear``.

``quantize_model(model, mode)`` swaps every ``nn.Linear`` of the language model (decoder layers and
lm_head; the vision tower and the projector only run at prefill and keep theirs) and returns how many
it swapped; ``fast_linears(model, quantize)`` is what the CLI calls after loading (int8 when asked,
else prepacked bf16 where it applies). The model stays stateless. With int8 its state_dict holds the
replacement's tensors (``weight`` int8 + ``scales``), so quantize after loading and export before
quantizing; prepacking leaves the state_dict as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "int8", "bf16-prepacked")
INT8_KERNEL_MAX_ROWS = 64  # rows (tokens x batch) up to which the int8 GEMV kernel runs; above: dequantize + GEMM
_INT8_K_MULTIPLE = 64  # the CPU int8 kernel reads garbage for some other input widths (seen with K = 8, 36, 100)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (int8 [N, K], scales [N] bfloat16) with weight ~= int8 * scales.

    Symmetric per output channel: scale = max |w| of the row / 127, rounded to bf16 first (the kernel
    multiplies by bf16 scales) so the int8 values are chosen for the scale actually used.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D linear weight [out, in], got shape {tuple(weight.shape)}.")
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)  # [N]
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scales


class Int8Linear(nn.Module):
    """``y = x @ (weight * scales[:, None]).T + bias`` with ``weight`` int8 [N, K] and ``scales`` bf16 [N]."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.use_kernel = weight.device.type == "cpu" and self.in_features % _INT8_K_MULTIPLE == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = quantize_int8_per_channel(linear.weight)
        return cls(q, scales, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight the int8 values stand for, [N, K] in ``dtype``."""
        return (self.weight.to(dtype) * self.scales.to(dtype)[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, K]
        if self.use_kernel and rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)  # [M, N] bf16
        else:
            y = F.linear(rows, self.dequantized_weight())
        y = y.to(x.dtype)  # the caller's dtype: a later model.to(dtype) keeps working
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, bf16 scales"


class PrepackedBF16Linear(nn.Module):
    """A bf16 ``nn.Linear`` whose weight oneDNN reordered once; ``weight`` stays as it was (state_dict unchanged).

    CPU only; the packed copy is an opaque oneDNN tensor that is not saved and that torch.compile cannot trace.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.weight.dtype != torch.bfloat16 or linear.weight.device.type != "cpu":
            raise ValueError(f"bf16-prepacked needs a bfloat16 CPU weight, got {linear.weight.dtype} on "
                             f"{linear.weight.device}; load the model with --dtype bfloat16 --device cpu.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # dynamo cannot trace the opaque packed tensor: the plain linear
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")


def language_model_linears(name: str, module: nn.Module) -> bool:
    """The default selection: every nn.Linear of the language model (decoder layers and lm_head)."""
    return isinstance(module, nn.Linear) and (name.startswith("language_model.") or name == "lm_head"
                                              or name.startswith("model.layers."))


def quantize_model(model: nn.Module, mode: str,
                   select: Callable[[str, nn.Module], bool] = language_model_linears) -> int:
    """Replace the selected linears of ``model`` in place (see the module docstring); returns how many.

    ``mode``: "none" (nothing), "int8" or "bf16-prepacked". Works on an R4BForConditionalGeneration and on a
    bare Qwen3ForCausalLM. Parameters must be real (not on the meta device).
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}.")
    if mode == "none":
        return 0
    build = Int8Linear.from_linear if mode == "int8" else PrepackedBF16Linear
    chosen = [(name, m) for name, m in model.named_modules() if name and select(name, m)]
    for name, linear in chosen:
        if linear.weight.device.type == "meta":
            raise ValueError(f"{name}: its weight is on the meta device; load the weights before quantizing.")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            setattr(parent, attr, build(linear))
    return len(chosen)


def bf16_prepack_available(model: nn.Module) -> bool:
    """Whether ``bf16-prepacked`` can serve ``model``: its language model is bf16 on the CPU and this torch's
    oneDNN has bf16 kernels for this CPU."""
    head = _language_model_head(model)
    return (head is not None and head.dtype == torch.bfloat16 and head.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _language_model_head(model: nn.Module) -> torch.Tensor | None:
    for name in ("language_model.lm_head", "lm_head"):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        weight = getattr(module, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None
    return None


def fast_linears(model: nn.Module, quantize: str = "none") -> str:
    """The decode speed-up the CLI applies after loading; returns the mode used.

    ``quantize="int8"``: int8 weights. Otherwise, a bf16 model on a CPU with oneDNN bf16 kernels gets
    ``bf16-prepacked`` (the same numbers, 2-3x the decode speed of plain bf16 there; it keeps a second,
    packed copy of the language model's weights); anything else is left as it is ("none").
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}.")
    mode = quantize
    if mode == "none" and bf16_prepack_available(model):
        mode = "bf16-prepacked"
    quantize_model(model, mode)
    return mode


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (int8 weights count one byte each)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
