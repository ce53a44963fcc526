"""The repository's own files as tests read them: README and docs/ code blocks, and the examples."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"


def doc(name: str) -> str:
    """The text of the documentation page `docs/{name}`."""
    return (DOCS / name).read_text(encoding="utf-8")


#: The README and every page of the documentation site, as one text to look snippets up in.
EVERY_PAGE = "\n".join([README, *(path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.md")))])
EXAMPLES = ROOT / "examples"


def code_after(marker: str) -> str:
    """The Python block after `<!-- readme-test: marker -->`, in the README or a docs page."""
    match = re.search(rf"<!-- readme-test: {marker} -->\n```python\n(.*?)```", EVERY_PAGE, re.S)
    assert match, marker
    return match.group(1)


def load_example(name: str) -> ModuleType:
    """`examples/{name}.py`, imported as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
