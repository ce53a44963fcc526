"""The TypeScript setup docs/ui-kit.md shows type-checks: its tsconfig and its example, compiled by
`tsc --strict` against the `billing.d.ts` the package ships. Runs where Node.js is installed; TypeScript
comes from the PATH, else from the npm registry into a temporary directory (skipped, saying why, when
neither works)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .repo_files import ROOT

DOC = (ROOT / "docs" / "ui-kit.md").read_text(encoding="utf-8")
DECLARATIONS = ROOT / "ciris_billing_proxy" / "ui" / "billing.d.ts"


def block(marker: str, language: str) -> str:
    match = re.search(rf"<!-- docs-test: {marker} -->\n```{language}\n(.*?)```", DOC, re.S)
    assert match, marker
    return match.group(1)


@pytest.fixture(scope="module")
def tsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    found = shutil.which("tsc")
    if found is not None:
        yield [found]
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("tsc is not on the PATH and npm is not installed")
    where = tmp_path_factory.mktemp("typescript")
    install = [npm, "install", "--prefix", str(where), "--no-audit", "--no-fund", "--silent", "typescript@5"]
    try:
        result = subprocess.run(install, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("npm could not install TypeScript within 5 minutes")
    if result.returncode != 0:
        pytest.skip(f"npm could not install TypeScript: {result.stderr.strip()[-300:]}")
    yield [node, str(where / "node_modules" / "typescript" / "bin" / "tsc")]


def project(root: Path, tsconfig: dict[str, object]) -> Path:
    """The docs' layout: the declarations in types/, the example in src/."""
    (root / "types" / "ciris-billing").mkdir(parents=True)
    shutil.copy(DECLARATIONS, root / "types" / "ciris-billing" / "billing.d.ts")
    (root / "src").mkdir()
    (root / "src" / "shop.ts").write_text(block("typescript", "ts"), encoding="utf-8")
    (root / "tsconfig.json").write_text(json.dumps(tsconfig), encoding="utf-8")
    return root


def compile_project(tsc: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tsc, "-p", str(root)], capture_output=True, text=True, timeout=300, check=False, cwd=root
    )


def test_the_documented_setup_type_checks_strictly(tsc: list[str], tmp_path: Path) -> None:
    tsconfig = json.loads(block("tsconfig", "json"))
    assert tsconfig["compilerOptions"]["strict"] is True
    result = compile_project(tsc, project(tmp_path, tsconfig))
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_the_path_mapping_the_import_is_unknown(tsc: list[str], tmp_path: Path) -> None:
    # What the docs fix: the module's URL alone gives TypeScript nothing to read.
    tsconfig = json.loads(block("tsconfig", "json"))
    del tsconfig["compilerOptions"]["paths"]
    result = compile_project(tsc, project(tmp_path, tsconfig))
    assert "TS2307" in result.stdout
