"""Faster linears for CPU decoding, swapped in from outside the model (the model code never changes).

Decoding one token is a chain of matrix-vector products (M = batch = 1..8 rows against every weight),
so its speed is the speed at which the weights stream from memory. Two replacements for
``nn.Linear``, applied to the language model after its weights are loaded:

- ``prepacked``: the same float32 or bfloat16 weights, reordered once into oneDNN's blocked layout
  (``mkldnn._reorder_linear_weight``) and run with ``mkldnn._linear_pointwise``; the plain weight is not
  kept (``weight`` and the state_dict unpack it on demand), so memory does not grow. Measured on the
  2-core AVX-512 BF16 CPU of BENCHMARKS.md: ``F.linear`` streams the weights at 15-21 GB/s there (float32
  and bf16 alike), the prepacked call at 36-48 GB/s; prefill GEMMs get faster too. Except on an AVX2-only
  CPU in float32: from ``UNPACKED_GEMM_ROWS`` rows on (a whole image prompt, the vision tower) MKL's GEMM on
  the weight unpacked for the call is faster there, used when the weight is no larger than the output (a
  2,961-token image prefill 7.24 -> 6.79 s, small preset).
- ``int8``: weight-only int8 with one scale per output channel (symmetric, round to nearest): 1 byte
  per weight instead of 2 (bf16) or 4 (fp32). Activations run in bfloat16 through
  ``aten._weight_int8pack_mm``; outputs are cast back to the input's dtype. Long inputs (prefill, more
  than ``INT8_KERNEL_MAX_ROWS`` rows) dequantize the weight to bf16 for the call and use a plain GEMM,
  which is compute-bound there anyway.

``quantize_model(model, mode)`` swaps the linears in place and returns how many: int8 those of the
language model (decoder layers and lm_head; the vision tower and the projector only run at prefill and
keep their weights), prepacked every ``nn.Linear`` (prefill GEMMs run faster through oneDNN too).
``fast_linears(model, quantize)`` is what the CLI's ``--quantize auto|none|int8`` calls after loading.
The model stays stateless. With int8 its state_dict holds the replacement's tensors (``weight`` int8 +
``scales``), so quantize after loading and export before quantizing; prepacking leaves the state_dict's
names, shapes and values as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "int8", "prepacked")
CLI_CHOICES = ("auto", "none", "int8")  # --quantize; auto = prepacked where it applies (fast_linears)
INT8_KERNEL_MAX_ROWS = 64  # rows (tokens x batch) up to which the int8 GEMV kernel runs; above: dequantize + GEMM
PACKED_EXACT_ROWS = 16  # prepacked calls of up to this many rows run unpadded (see padded_rows)
UNPACKED_GEMM_ROWS = 1024  # from this many rows (and in_features), float32, AVX2-only CPU: MKL, unpacked weight
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


def padded_rows(rows: int) -> int:
    """The row count a prepacked call runs with: ``rows`` itself up to ``PACKED_EXACT_ROWS`` (decode batches),
    else rounded up: to a multiple of 8 below 64 rows, to one of 8 sizes per octave up to 512, to a multiple
    of 64 above (zero rows; at most 12.5 % more, about 2 % for a 3,000-token prefill).

    Why: oneDNN keeps state for every distinct row count it has seen (about 0.5 MiB per linear shape and row
    count, measured with a 3072 x 1024 weight: 400 distinct counts grew the process by 225 MiB with a fixed
    malloc mmap threshold, 960 MiB without), so a server fed prompts of random lengths grew without bound
    (a 200-request soak: 1.14x its memory after warm-up). Rounded, the server's prefill chunks (512 tokens by
    default) meet at most 46 row counts per weight shape. Above 512 rows the outputs are large enough for
    malloc to map them apart, so only the ~0.5 MiB per count remains."""
    if rows <= PACKED_EXACT_ROWS:
        return rows
    step = min(64, max(8, 1 << (rows.bit_length() - 4)))  # rows in [2^k, 2^(k+1)) -> steps of 2^(k-3), 8..64
    return -(-rows // step) * step


class PrepackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight lives only in oneDNN's packed layout (fp32 or bf16, CPU); same outputs up to
    the summation order.

    The plain weight is not kept (no second copy in memory): ``weight`` and ``state_dict()`` unpack it on
    demand, ``load_state_dict`` and ``.to(dtype)`` repack it. The packed tensor is opaque to torch.compile:
    compile the plain model instead (``fast_linears(..., compile=True)`` leaves the linears alone).
    """

    def __init__(self, linear: nn.Linear, rows_hint: int = 1) -> None:
        super().__init__()
        weight = linear.weight
        if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
            raise ValueError(f"prepacked linears need a float32 or bfloat16 CPU weight, got {weight.dtype} on "
                             f"{weight.device}; use --device cpu with --dtype float32 or bfloat16.")
        self.in_features, self.out_features, self.rows_hint = linear.in_features, linear.out_features, rows_hint
        self.bias = linear.bias
        self._pack(weight.detach())
        # measured on an AVX2-only EPYC (2 threads): at 3,008 rows a 3072x1024 weight took 146 ms packed vs 115 ms
        # through MKL (9728x2560: 1012 vs 880 ms) and unpacking costs 1.5-40 ms; at 64 rows packed is faster.
        # On the AVX-512 host of BENCHMARKS.md packed GEMMs were faster at every size, so this is AVX2 only.
        self._unpack_rows = UNPACKED_GEMM_ROWS if torch.backends.cpu.get_cpu_capability() == "AVX2" else None

    def _pack(self, weight: torch.Tensor) -> None:
        self.dtype = weight.dtype
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.rows_hint)

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight [N, K], unpacked (a new tensor on every access)."""
        return self._packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise RuntimeError("a PrepackedLinear cannot be compiled (its weight is an opaque oneDNN tensor); "
                               "compile the model without prepacking (fast_linears(model, compile=True)).")
        bias = None if self.bias is None else self.bias.detach()
        rows = x.reshape(-1, self.in_features)  # [M, K]
        m = rows.shape[0]
        # deliberate (see __init__); m >= K: the unpacked weight [N, K] is never larger than the output [m, N]
        unpack = self._unpack_rows is not None and self.dtype == torch.float32
        if unpack and m >= max(self._unpack_rows, self.in_features):
            return F.linear(x, self._packed.to_dense(), bias)
        padded = padded_rows(m)
        if padded != m:  # [M, K] -> [padded, K]: zero rows, dropped again below
            rows = F.pad(rows, (0, 0, 0, padded - m))
        y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, bias, "none", [], "")  # [padded, N]
        return y[:m].reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        elif tuple(state_dict[key].shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{key}: shape {tuple(state_dict[key].shape)}, expected "
                              f"{(self.out_features, self.in_features)}")
        else:
            self._pack(state_dict[key].detach().to(self.dtype))
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != key}, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the bias
        weight = fn(self.weight)
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"a PrepackedLinear stays on the CPU in float32 or bfloat16 (asked for {weight.dtype} on "
                             f"{weight.device}); move or cast the model before fast_linears / quantize_model.")
        self._pack(weight)
        return self

    def __getstate__(self) -> dict:  # copy.deepcopy and pickle: the opaque tensor travels as the plain weight
        state = self.__dict__.copy()
        state["_packed"] = self.weight
        return state

    def __setstate__(self, state: dict) -> None:
        weight = state.pop("_packed")
        self.__dict__.update(state)
        self._pack(weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, oneDNN prepacked"


def prepack_available(model: nn.Module) -> bool:
    """Whether ``prepacked`` can serve ``model``: its language model's linears are float32 or bfloat16 on the
    CPU, and this torch has oneDNN (with bf16 kernels for this CPU when the model is bf16)."""
    head = None
    for name in ("language_model.lm_head", "lm_head"):
        try:
            head = model.get_submodule(name)
            break
        except AttributeError:
            continue
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if head.weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return head.weight.dtype == torch.float32


def language_model_linears(name: str, module: nn.Module) -> bool:
    """int8's selection: every nn.Linear of the language model (decoder layers and lm_head)."""
    return isinstance(module, nn.Linear) and (name.startswith("language_model.") or name == "lm_head"
                                              or name.startswith("model.layers."))


def all_linears(name: str, module: nn.Module) -> bool:
    """prepacked's selection: every nn.Linear (the vision tower and projector get faster prefill GEMMs too)."""
    return isinstance(module, nn.Linear)


def quantize_model(model: nn.Module, mode: str, select: Callable[[str, nn.Module], bool] | None = None,
                   rows_hint: int = 1) -> int:
    """Replace the selected linears of ``model`` in place (see the module docstring); returns how many.

    ``mode``: "none" (nothing), "int8" or "prepacked". ``select(name, module)``: which modules; default
    ``language_model_linears`` for int8, ``all_linears`` for prepacked. Works on an R4BForConditionalGeneration
    and on a bare Qwen3ForCausalLM. Parameters must be real (not on the meta device). ``rows_hint``
    (prepacked): the rows per call oneDNN's layout is tuned for: 1 for one stream, a server's batch size
    (on the 2-core AVX2 CPU, small preset, 1 thread: a batch-8 decode step 3.8x batch 1's tokens/s with
    hint 8, 3.1x with hint 1; batch 1 about 8 % slower with hint 8).
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}.")
    if mode == "none":
        return 0
    build = Int8Linear.from_linear if mode == "int8" else (lambda linear: PrepackedLinear(linear, rows_hint))
    if select is None:
        select = language_model_linears if mode == "int8" else all_linears
    chosen = [(name, m) for name, m in model.named_modules() if name and select(name, m)]
    for name, linear in chosen:
        if linear.weight.device.type == "meta":
            raise ValueError(f"{name}: its weight is on the meta device; load the weights before quantizing.")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            setattr(parent, attr, build(linear))
    return len(chosen)


def fast_linears(model: nn.Module, quantize: str = "auto", compile: bool = False, rows_hint: int = 1) -> str:
    """The linears the CLI's ``--quantize`` asks for, applied after loading; returns the mode used.

    "int8": int8 weights. "none": the weights as loaded (``F.linear``, whose logits match transformers bit for
    bit). "auto": ``prepacked`` where it applies, a float32 or bfloat16 model on a CPU with oneDNN (and not
    to be compiled: the packed weights cannot be traced); else as loaded. ``rows_hint``: see ``quantize_model``.
    """
    if quantize not in CLI_CHOICES:
        raise ValueError(f"unknown --quantize {quantize!r}; choose one of {', '.join(CLI_CHOICES)}.")
    mode = quantize
    if quantize == "auto":
        mode = "prepacked" if not compile and prepack_available(model) else "none"
    quantize_model(model, mode, rows_hint=rows_hint)
    return mode
