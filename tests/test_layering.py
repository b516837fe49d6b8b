"""The import contracts in .importlinter (layers, r4b_kernels apart from r4b_core, transformers only in
parity, what r4b_core/__init__.py may import) hold for the source tree, and each one does fail when a
violating import is added.

Both run ``lint-imports`` (import-linter) in a subprocess with the tree's root as the working directory,
so the tree there is what is analysed (import-linter puts the working directory first on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("r4b_core", "r4b_weights", "r4b_kernels")

if importlib.util.find_spec("importlinter") is None:
    pytest.skip("import-linter is not installed (it is in the test extra: pip install -e '.[test]')",
                allow_module_level=True)


def lint_imports(cwd: Path, *contracts: str) -> subprocess.CompletedProcess:
    """``lint-imports`` from this interpreter's environment, without a cache (nothing written to ``cwd``)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    args = ["--no-cache", "--no-logo", *(a for c in contracts for a in ("--contract", c))]
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (see .importlinter):\n{output}"
    assert "0 broken" in output, output


# (contract id in .importlinter, file to append to, the violating import)
VIOLATIONS = [
    ("layers", "r4b_weights/names.py", "import r4b_core.models.r4b"),
    ("layers", "r4b_weights/loader.py", "from r4b_core.models.qwen3 import Qwen3ForCausalLM"),
    ("layers", "r4b_core/config.py", "from r4b_core.processing.processor import R4BProcessor"),
    ("model-math", "r4b_core/models/attention.py", "from r4b_core.models.qwen3 import Qwen3Model"),
    ("package-init", "r4b_core/__init__.py", "from r4b_core.generation.generate import generate"),
    ("kernels", "r4b_kernels/reference.py", "from r4b_core.config import TextConfig"),
    ("transformers", "r4b_core/models/r4b.py", "import transformers"),
    ("layers", "r4b_core/models/siglip.py", "from r4b_core.processing.image_processing import load_image"),
    ("layers", "r4b_core/processing/processor.py", "from r4b_core.generation.chat import chat"),
    ("layers", "r4b_core/generation/generate.py", "from r4b_core.training.lora import apply_lora"),
    ("layers", "r4b_core/training/data.py", "from r4b_core.serve.engine import Engine"),
    ("layers", "r4b_core/serve/engine.py", "from r4b_core.interp.logit_lens import logit_lens"),
    ("layers", "r4b_core/interp/logit_lens.py", "from r4b_core.cli.main import main"),
    ("transformers", "r4b_weights/loader.py", "from transformers import AutoConfig"),
]


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The three packages and .importlinter, copied (sources only) to a fresh directory."""
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / ".importlinter", root / ".importlinter")
    return root


@pytest.mark.parametrize("contract, path, line", VIOLATIONS, ids=[f"{c}:{p}:{l}" for c, p, l in VIOLATIONS])
def test_a_violating_import_breaks_its_contract(tree_copy, contract, path, line):
    target = tree_copy / path
    original = target.read_text(encoding="utf-8")
    target.write_text(original + f"\n{line}  # injected by tests/test_layering.py\n", encoding="utf-8")
    try:
        result = lint_imports(tree_copy, contract)
    finally:
        target.write_text(original, encoding="utf-8")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "1 broken" in output, f"{contract!r} did not catch `{line}` in {path}:\n{output}"
    importer = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert importer in output, output  # the report names the offending module
