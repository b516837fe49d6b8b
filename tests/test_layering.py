"""The import contracts in .importlinter (layers, r4b_kernels apart from r4b_core, transformers only in
parity, what r4b_core/__init__.py may import) hold for the source tree, and each one does fail when a
violating import is added.

Both run ``lint-imports`` (import-linter) in a subprocess with the tree's root as the working directory,
so the tree there is what is analysed (import-linter puts the working directory first on sys.path). The
planted imports all go into one copy of the tree, checked by one run: each must be named, with its line,
in the report of the contract it breaks.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
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
def planted_report(tmp_path_factory) -> tuple[str, dict[tuple[str, str], int]]:
    """(lint-imports' report, {(file, planted import): its line number}) for a copy of the three packages and
    .importlinter (sources only) with every import of ``VIOLATIONS`` appended to its file: one run of
    lint-imports for all of them."""
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / ".importlinter", root / ".importlinter")
    line_of = {}
    for _, path, line in VIOLATIONS:
        target = root / path
        text = target.read_text(encoding="utf-8").rstrip("\n") + f"\n{line}  # injected by tests/test_layering.py\n"
        target.write_text(text, encoding="utf-8")
        line_of[path, line] = text.count("\n")
    result = lint_imports(root)
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    return report, line_of


def _contract_section(report: str, contract: str) -> str:
    """The part of the report that details the broken ``contract`` (named by its id in .importlinter)."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    title = config[f"importlinter:contract:{contract}"]["name"]
    details = report.split("Broken contracts", 1)[1]
    assert f"\n{title}\n" in details, f"contract {contract!r} ({title}) is not reported broken:\n{report}"
    section = details.split(f"\n{title}\n", 1)[1]
    titles = [config[s]["name"] for s in config.sections() if s.startswith("importlinter:contract:")]
    ends = [section.index(f"\n{t}\n") for t in titles if t != title and f"\n{t}\n" in section]
    return section[:min(ends, default=len(section))]


@pytest.mark.parametrize("contract, path, line", VIOLATIONS, ids=[f"{c}:{p}:{l}" for c, p, l in VIOLATIONS])
def test_a_violating_import_breaks_its_contract(planted_report, contract, path, line):
    """Each planted import is named, by module and line, in the report of the contract it breaks."""
    report, line_of = planted_report
    section = _contract_section(report, contract)
    importer = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    imported = line.split()[1]  # "import X" / "from X import Y"
    edge = re.compile(rf"^[\s-]*{re.escape(importer)} -> {re.escape(imported)} \((l\.\d+, )*l\.{line_of[path, line]}[,)]",
                      re.M)
    assert edge.search(section), f"{contract!r} did not report `{line}` in {path}:\n{section}"
