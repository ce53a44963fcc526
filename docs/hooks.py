"""MkDocs hook: adds the reference pages generated from the code (configuration, CLI, HTTP API)."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from ciris_billing_proxy.tools.reference import pages


def on_files(files: Files, config: Any) -> Files:
    for name, content in pages().items():
        files.append(File.generated(config, f"reference/{name}", content=content))
    return files
