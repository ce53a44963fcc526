"""Every link in the README and docs/ leads somewhere: files exist, in-page anchors are headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ciris_billing_proxy.tools.reference import pages

ROOT = Path(__file__).resolve().parents[1]
GENERATED = set(pages())
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# `docs/...` named in running text or code spans, not only as links.
DOCS_MENTION = re.compile(r"(?<![\w/.-])(docs/[\w./-]*\w)")
# The specs this package was written from; users get docs/ instead.
SPEC_NAMES = re.compile(r"\b(BILLING_API|COMPATIBILITY|BILLING_BACKEND)\.md")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(page: Path) -> list[str]:
    return LINK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files_and_headings(page: Path) -> None:
    for link in links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if path.parent == ROOT / "docs" / "reference" and path.name in GENERATED:
            continue  # made by the site's build from the code (ciris_billing_proxy.tools.reference)
        assert path.exists(), f"{page.name}: {link} points to a missing file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: {link} names no heading of {path.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_mentioned_in_text_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not SPEC_NAMES.search(text), f"{page.name} names a document this repository does not ship"
    for mention in DOCS_MENTION.findall(text):
        assert (ROOT / mention).exists(), f"{page.name} mentions {mention}, which does not exist"


def test_the_code_names_only_docs_that_exist() -> None:
    sources = [*(ROOT / "ciris_billing_proxy").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    for source in sources:
        text = source.read_text(encoding="utf-8")
        assert not SPEC_NAMES.search(text), f"{source.name} names a document this repository does not ship"
        for mention in DOCS_MENTION.findall(text):
            assert (ROOT / mention).exists(), f"{source.name} mentions {mention}, which does not exist"


def test_the_three_documents_exist() -> None:
    for name in ("billing-api.md", "compatibility.md", "billing-backend.md"):
        assert (ROOT / "docs" / name).is_file()
