"""Where r4b's Triton kernels run: is Triton usable, compiled on CUDA or interpreted, the interpreter shim.

Triton is optional (the SDPA path works without it): this module imports without it and says why the
kernels cannot run (``unavailable_reason``).

Kernels are plain Python functions, wrapped lazily, per mode, at their first launch (``wrap_kernel``):
tensors on a CUDA device run ``triton.jit``-compiled kernels; anything else (CPU tensors) or
``TRITON_INTERPRET=1`` runs the interpreter (``InterpretedFunction``). So the import order of the
kernel modules and of ``triton`` relative to setting the variable does not matter.

One more wrinkle is handled here: Triton decides at *its* import whether its own ``@triton.jit``
library (tl.max, tl.sum, tl.cdiv, ...) is compiled or interpreted. ``interpretable_jit_functions``
lets an interpreted launch call that library even when Triton was imported before
TRITON_INTERPRET=1 was set.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

try:
    import triton

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install raising at import)
    triton = None
    TRITON_IMPORT_ERROR = exc

_WRAPPED: dict[tuple[Callable, bool], object] = {}
_PATCH_LOCK = threading.RLock()


def interpret_env() -> bool:
    """TRITON_INTERPRET as Triton itself parses it."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when Triton kernels can run for ``device`` (default: cuda), else a one-line reason."""
    if triton is None:
        return f"Triton is not importable ({TRITON_IMPORT_ERROR!r})"
    if interpret_env():
        return None
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device (set TRITON_INTERPRET=1 to run the Triton interpreter)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def is_available(device: torch.device | str | None = None) -> bool:
    """Triton importable and either TRITON_INTERPRET=1 or ``device`` (default: cuda) a usable CUDA device."""
    return unavailable_reason(device) is None


def use_interpreter(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs the interpreter: TRITON_INTERPRET=1, or not a CUDA device."""
    return interpret_env() or device.type != "cuda"


def wrap_kernel(fn: Callable, interpret: bool) -> object:
    """``fn`` as a launchable kernel, interpreted or compiled (``triton.jit``), wrapped once per mode."""
    key = (fn, interpret)
    if key not in _WRAPPED:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:  # only reached without TRITON_INTERPRET=1, so triton.jit compiles
            wrap = triton.jit
        _WRAPPED[key] = wrap(fn)
    return _WRAPPED[key]


@contextlib.contextmanager
def interpretable_jit_functions() -> Iterator[None]:
    """Let interpreted kernels call Triton's own ``@triton.jit`` helpers (tl.max, tl.sum, tl.cdiv, ...).

    When Triton was imported before TRITON_INTERPRET=1 was set (another test module, torch.compile's
    Triton probe), its standard library is compiled-only and an interpreted kernel calling it fails
    with "Cannot call @triton.jit'd outside of the scope of a kernel". For the duration of an
    interpreted launch, such calls run through the interpreter instead (what they would do had the
    variable been set first). No effect when Triton was imported in interpreter mode.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with _PATCH_LOCK:
        original = JITFunction.__dict__.get("__call__")
        if getattr(original, "_r4b_interpret", False):  # nested launch: already patched
            yield
            return
        cache: dict[int, InterpretedFunction] = {}

        def call(self, *args, **kwargs):
            fn = cache.get(id(self))
            if fn is None:
                fn = cache[id(self)] = InterpretedFunction(self.fn)
            return fn(*args, **kwargs)

        call._r4b_interpret = True
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = original
