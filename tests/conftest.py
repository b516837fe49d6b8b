"""Shared test fixtures and helpers: the session's tiny synthetic checkpoint, its processor, model and
transformers reference (read-only, shared by every file); random-weight transformers Qwen3 checkpoints written with
save_pretrained; the test picture; scripts/ on the import path (for `shapes_data`).

transformers is imported only inside the helpers and fixtures that need it, so the tests that do not
compare with it run (and `pytest.importorskip("transformers")` can skip) without it installed.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from PIL import Image

from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.reference.synthetic import make_synthetic_checkpoint, synthetic_picture

if TYPE_CHECKING:
    import transformers

# scripts/shapes_data.py (the demo task of scripts/train.py) is imported by the training tests as `shapes_data`
SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

TINY_SEED = 0  # the seed of the shared tiny checkpoint


def transformers_5() -> bool:
    """Whether the installed transformers is 5.x or later (it spells RoPE as ``rope_parameters``)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter, norms included (unit norm weights would hide QK-norm order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.15 * noise)


def hf_qwen3_config(n_kv_heads: int = 2, tie: bool = False, rope_theta: float = 10000.0,
                    rope_type: str = "default", factor: float = 2.0, **overrides) -> transformers.Qwen3Config:
    """A small transformers ``Qwen3Config`` (vocabulary 256, width 64, 3 layers) in this transformers' RoPE form."""
    import transformers

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=16, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="sdpa")
    kwargs.update(overrides)
    if transformers_5():
        params = {"rope_type": rope_type, "rope_theta": rope_theta}
        if rope_type == "linear":
            params["factor"] = factor
        kwargs["rope_parameters"] = params
    else:
        kwargs["rope_theta"] = rope_theta
        kwargs["rope_scaling"] = {"rope_type": rope_type, "factor": factor} if rope_type != "default" else None
    return transformers.Qwen3Config(**kwargs)


def rewrite_rope_form(config_path: Path, form: str) -> None:
    """Rewrite config.json's RoPE keys as transformers 4.x ("rope_theta") or 5.x ("rope_parameters") does."""
    d = json.loads(config_path.read_text())
    if "rope_parameters" in d and d["rope_parameters"] is not None:
        params = dict(d.pop("rope_parameters"))
    else:
        params = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
        params["rope_theta"] = d.pop("rope_theta", 10000.0)
    d.pop("rope_scaling", None)
    d.pop("rope_theta", None)
    if form == "rope_parameters":
        d["rope_parameters"] = params
    else:
        d["rope_theta"] = params.pop("rope_theta")
        params.setdefault("rope_type", "default")
        d["rope_scaling"] = None if params == {"rope_type": "default"} else params
    config_path.write_text(json.dumps(d, indent=2))


def save_random_hf_qwen3(directory: Path, seed: int = 0, rope_form: str | None = None, **config_kwargs):
    """Build transformers' Qwen3ForCausalLM with random weights, save_pretrained it; return the model."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_qwen3_config(**config_kwargs)).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    if rope_form is not None:
        rewrite_rope_form(Path(directory) / "config.json", rope_form)
    return model


@pytest.fixture
def hf_qwen3_dir(tmp_path):
    """(directory, transformers model) for a default random tiny Qwen3 (GQA 2, untied)."""
    model = save_random_hf_qwen3(tmp_path / "qwen3")
    return tmp_path / "qwen3", model


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Noise plus shapes: content that is not flat (the one generated picture, r4b_core.reference.synthetic's)."""
    return synthetic_picture(width, height, seed)


# ---------------------------------------------------------------------------------------------
# the session's tiny checkpoint, model and reference: written, loaded and built once, shared read-only


def _file_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``directory``."""
    return {str(f.relative_to(directory)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _changes_to_shared_model(model: torch.nn.Module, state: dict[str, torch.Tensor], hooks: bool = True) -> list[str]:
    """What a test changed in a shared model: weights or buffers, train mode, gradients and (``hooks``) forward or
    backward hooks left attached. An empty list: nothing."""
    now = model.state_dict()
    changes = [f"tensor {k!r} changed" for k in sorted(state.keys() | now.keys())
               if k not in state or k not in now or not torch.equal(state[k], now[k])]
    changes += [f"{name or 'the root'} left in train mode" for name, m in model.named_modules() if m.training]
    changes += [f"{name} has a .grad or lost requires_grad" for name, p in model.named_parameters()
                if p.grad is not None or not p.requires_grad]
    if hooks:
        changes += [f"{name or 'the root'} holds a hook" for name, m in model.named_modules()
                    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    return changes


def _check_shared_model_untouched(model: torch.nn.Module, state: dict[str, torch.Tensor], fixture: str,
                                  hooks: bool = True) -> None:
    changes = _changes_to_shared_model(model, state, hooks)
    if changes:
        raise RuntimeError(
            f"a test modified the session-wide `{fixture}` fixture ({'; '.join(changes[:5])}): tests that change "
            f"a model must make their own (R4BForConditionalGeneration.from_pretrained(tiny_checkpoint), "
            f"r4b_core.reference.parity.build_reference_model(tiny_checkpoint))."
        )


@pytest.fixture(autouse=True)
def _threads_ignore_the_machine_s_load(monkeypatch):
    """r4b commands run in-process take the physical cores whatever the load of this (shared) machine:
    r4b_core/threads.py would take fewer and print a note, and tests compare stderr line by line
    (tests/test_hardening_threads.py injects loads)."""
    monkeypatch.setattr("r4b_core.threads.cpu_load", lambda: None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plain tiny synthetic checkpoint (preset "tiny", seed ``TINY_SEED``), written once per session.

    Shared: never write into it (copy it with ``tiny_checkpoint_copy`` to edit files); a test that needs a
    variant (tied head, other pinpoints, another seed, the Qwen tokenizer) writes its own. The session
    fails at teardown if any file in it was changed, added or removed.
    """
    directory = make_synthetic_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), "tiny", seed=TINY_SEED)
    stamps = _file_stamps(directory)
    yield directory
    if _file_stamps(directory) != stamps:
        raise RuntimeError(f"a test wrote into the shared tiny checkpoint {directory}: copy it first "
                           "(the `tiny_checkpoint_copy` fixture) and edit the copy.")


@pytest.fixture
def tiny_checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint, free to edit."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> R4BForConditionalGeneration:
    """r4b's model loaded from ``tiny_checkpoint`` (fp32, CPU, eval), shared by the session: read-only.

    Tests that train it, change its modules, attach hooks or switch it to train mode load their own; the
    session fails at teardown if the shared one was changed.
    """
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    _check_shared_model_untouched(model, state, "tiny_model")


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint: Path) -> R4BProcessor:
    """``R4BProcessor.from_pretrained(tiny_checkpoint)``, shared by the session: read-only (a test that sets
    an attribute such as ``max_image_pixels`` loads its own; the session fails at teardown if it changed)."""
    processor = R4BProcessor.from_pretrained(tiny_checkpoint)
    before = dict(vars(processor))
    yield processor
    now = vars(processor)  # public settings only: private ones are lazily built caches
    changed = sorted(k for k in before.keys() | now.keys()
                     if not k.startswith("_") and (k not in before or k not in now or now[k] is not before[k]))
    if changed:
        raise RuntimeError(f"a test changed the session-wide `tiny_processor` fixture (attributes {changed}): load "
                           "your own with R4BProcessor.from_pretrained(tiny_checkpoint).")


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint: Path) -> torch.nn.Module:
    """transformers' reference model (r4b_core.reference.parity.build_reference_model) of ``tiny_checkpoint``,
    shared by the session: read-only, like ``tiny_model``."""
    from r4b_core.reference.parity import build_reference_model

    model = build_reference_model(tiny_checkpoint)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    # no hook check: transformers attaches its own output-recording hooks to the layers on the first forward
    _check_shared_model_untouched(model, state, "tiny_reference", hooks=False)


def fail_on_second_write(monkeypatch) -> list:
    """safetensors' save_file succeeds once, then fails as a full disk does."""
    from r4b_weights import safetensors_io as _sio

    real, calls = _sio.save_file, []

    def save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(_sio, "save_file", save_file)
    return calls


class Collector:
    """An engine request's on_event sink (r4b_core.serve.engine): records events, signals the finish."""

    def __init__(self) -> None:
        import queue
        import threading

        self.events: queue.Queue = queue.Queue()
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.put(event)
        if event.kind == "finish":
            self.done.set()

    def finish(self):
        """The last event recorded (the finish, once ``done`` is set)."""
        return list(self.events.queue)[-1]


@pytest.fixture
def never_loaded(monkeypatch):
    """Loading the weights fails the test: what is checked there must be checked before."""
    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was found")

    monkeypatch.setattr(R4BForConditionalGeneration, "from_pretrained", load)
