"""Every repository path the docs name exists: README.md and docs/*.md, in backticks, as a link, or as a
``dir/file.py``-like word anywhere (prose, tables, the data-flow and layout blocks).

A path is a token with a slash whose first part is a directory of the repository (``r4b_weights/loader.py``,
``scripts/train.py``) or a subpackage of r4b_core (``models/attention.py``, read from r4b_core/), and a
bare ``name.py`` / ``name.sh`` anywhere in the tree. ``models/anyres.anyres_max_downscale`` names
``models/anyres.py``. Names of a checkpoint's files (``config.json``) and hub ids are not repository paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
SUBPACKAGES = {p.name for p in (ROOT / "r4b_core").iterdir() if (p / "__init__.py").exists()}
TOKEN = re.compile(r"`([^`\s]+)`|\]\(([^)\s#]+)")


def named_paths(doc: Path) -> list[str]:
    found = []
    for m in TOKEN.finditer(doc.read_text()):
        token = (m.group(1) or m.group(2)).rstrip(".,:;")
        if token.startswith(("http:", "https:", "-", "$")):
            continue
        if "/" in token and token.split("/")[0] in TOP | SUBPACKAGES:
            found.append(token)
        elif re.fullmatch(r"[\w-]+\.(py|sh)", token):
            found.append(token)
    roots = "|".join(sorted(TOP | SUBPACKAGES))
    found += re.findall(rf"(?<![\w/.-])((?:{roots})/[\w./-]*\w\.(?:py|md|sh))\b", doc.read_text())
    return found


def exists(token: str, doc: Path) -> bool:
    if "/" not in token:  # a bare file name: anywhere in the tree
        return any(p for p in ROOT.rglob(token) if ".git" not in p.parts)
    bases = [ROOT, ROOT / "r4b_core", doc.parent]
    module = re.sub(r"\.\w+$", "", token) + ".py"  # models/anyres.name -> models/anyres.py
    return any((b / token).exists() or (b / (token + ".py")).exists() or (b / module).exists() for b in bases)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    paths = named_paths(doc)
    assert paths, f"{doc.name} names no path: the check would pass vacuously"
    missing = [p for p in paths if not exists(p, doc)]
    assert not missing, f"{doc.relative_to(ROOT)} names paths the repository lacks: {missing}"
