"""The documentation site builds strictly, and its reference pages cover the code they are generated from."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ciris_billing_proxy.config import ENV_VARS, BillingConfig, JWTConfig
from ciris_billing_proxy.tools.cli import build_parser
from ciris_billing_proxy.tools.reference import PROVIDER_SETTINGS, field_notes, pages

from .repo_files import ROOT


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    # --strict turns every warning into a failure: a broken link, a missing page, an unknown anchor.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for page in ("index.html", "reference/configuration/index.html", "reference/cli/index.html"):
        assert (tmp_path / "site" / page).exists(), page


def test_every_setting_is_in_the_configuration_reference_with_its_meaning() -> None:
    page = pages()["configuration.md"]
    for var in ENV_VARS:
        assert f"| `{var}`<br>" in page, var
    for _, _model, env in PROVIDER_SETTINGS:
        for var in env:
            assert f"| `{var}`<br>" in page, var
    # A field that an operator can set must say what it does: the reference shows the `#:` comment.
    described = {**field_notes(BillingConfig), **{f"jwt.{k}": v for k, v in field_notes(JWTConfig).items()}}
    for _, (section, field, _) in ENV_VARS.items():
        name = f"jwt.{field}" if section == "jwt" else field
        assert described.get(name), f"BillingConfig field {name} has no '#:' comment to document it"
    for provider, model, env in PROVIDER_SETTINGS:
        notes = field_notes(model)
        for field in env.values():
            assert notes.get(field), f"{provider} setting {field} has no '#:' comment to document it"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_commands(sub, prefix + name + " "))
    return found


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    page = pages()["cli.md"]
    for name, sub in _commands(build_parser()).items():
        assert f"`ciris-billing-proxy {name}`" in page, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"{name} {flag}"


def test_every_route_is_in_the_http_reference() -> None:
    from ciris_billing_proxy.openapi import openapi_document
    from ciris_billing_proxy.paths import DEFAULT_LOGIN_PATH, DEFAULT_PREFIX

    page = pages()["http-api.md"]
    for path, methods in openapi_document(DEFAULT_PREFIX, DEFAULT_LOGIN_PATH)["paths"].items():
        for method in methods:
            assert f"## `{method.upper()} {path}`" in page
