"""Which torch devices this process can use: one check, shared by the command line and the loaders.

``check_device("cuda:7")`` returns the ``torch.device`` when this torch build and machine can hold
tensors there, and otherwise raises one ``ValueError`` that names the device and lists what this
build offers (``cpu``, ``cuda:0`` ... when CUDA is usable, ``mps``, ...). It runs before any weights
are read, so a wrong ``--device`` (or ``from_pretrained(device=...)``) costs nothing and never ends
in torch's ``AssertionError: Torch not compiled with CUDA enabled`` traceback. The ``meta`` device
holds no data, so a model cannot be loaded or run there; it is refused too.
"""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The devices this torch build can use on this machine, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    found = ["cpu"]
    try:
        if torch.cuda.is_available():
            found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except (RuntimeError, AssertionError):
        pass
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def _build() -> str:
    cuda = torch.version.cuda
    return f"this torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'built without CUDA'})"


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` this process can put tensors on; else a ValueError naming it."""
    name = str(device)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a torch device ({_first_line(e)}); use one of "
                         f"{', '.join(available_devices())}.") from None
    if parsed.type == "meta":
        raise ValueError(f"device {name} holds no data (shapes only); a model cannot be loaded or run there. "
                         f"Use one of {', '.join(available_devices())}.")
    offered = ", ".join(available_devices())
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} is not available: {_build()} sees no usable CUDA GPU; "
                             f"this machine offers {offered}.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {name} is not available: this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s) ({offered}).")
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"device {name} is not available to {_build()} ({_first_line(e)}); this machine offers "
                         f"{offered}.") from None
    return parsed


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
