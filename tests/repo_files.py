"""The repository's own files as tests read them: README code blocks and the examples."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = ROOT / "examples"


def code_after(marker: str) -> str:
    """The README's Python block after `<!-- readme-test: marker -->`."""
    match = re.search(rf"<!-- readme-test: {marker} -->\n```python\n(.*?)```", README, re.S)
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
