"""The reference pages of the documentation site, generated from the code so they cannot drift.

- configuration: every `BillingConfig` field (and `jwt.*`) with its environment variable, type,
  default and meaning, and each built-in provider's settings the same way;
- command line: every subcommand of `ciris-billing-proxy` and each of its options, read from the
  `argparse` parsers the command itself uses;
- HTTP API: every route of the OpenAPI document the server serves, with each status it answers.

A field's meaning is its attribute docstring: the `#:` comment lines just above it in the class body.
The MkDocs hook in `docs/hooks.py` adds these pages to the site at build time.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..config import ENV_VARS, BillingConfig, JWTConfig
from ..openapi import openapi_document
from ..paths import DEFAULT_LOGIN_PATH, DEFAULT_PREFIX
from ..providers import simple
from ..providers.ciris import settings as ciris_settings
from ..providers.stripe import settings as stripe_settings
from .cli import build_parser

_FIELD = re.compile(r"^\s+(\w+)\s*:")


def field_notes(model: type[BaseModel]) -> dict[str, str]:
    """Each field's `#:` comment lines (joined), read from the class's own source."""
    notes: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(model).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = _FIELD.match(line)
        if match and pending:
            notes[match.group(1)] = " ".join(pending)
        pending = []
    return notes


def _type_name(info: FieldInfo) -> str:
    text = repr(info.annotation) if not isinstance(info.annotation, type) else info.annotation.__name__
    text = re.sub(r"\b(?:typing|pydantic\.types|pathlib|ipaddress|collections\.abc)\.", "", text)
    return text.replace("NoneType", "None")


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "none"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Path):
        return f"`{str(value).replace(str(Path.home()), '~')}`"
    if isinstance(value, frozenset | tuple | list | dict) and not value:
        return "empty"
    if isinstance(value, frozenset):
        value = sorted(value)
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table(
    model: type[BaseModel], env_for: Mapping[str, str], prefix: str = "", skip: Iterable[str] = ()
) -> str:
    """A Markdown table of `model`'s fields: the variable with the field and its type, the default,
    the meaning."""
    notes = field_notes(model)
    rows = ["| Setting | Default | Meaning |", "|---|---|---|"]
    skipped = set(skip)
    for name, info in model.model_fields.items():
        if name in skipped:
            continue
        var = env_for.get(name)
        setting = f"`{var}`<br>" if var else "(in code only)<br>"
        setting += f"field `{prefix}{name}`: {_type_name(info).replace('|', 'or')}"
        meaning = _cell(notes.get(name, info.description or ""))
        rows.append(f"| {setting} | {_cell(_default(info))} | {meaning} |")
    return "\n".join(rows)


def _env_for(section: str) -> dict[str, str]:
    return {field: var for var, (where, field, _) in ENV_VARS.items() if where == section}


PROVIDER_SETTINGS: tuple[tuple[str, type[BaseModel], Mapping[str, str]], ...] = (
    ("simple", simple.SimpleSettings, simple.ENV_VARS),
    ("ciris", ciris_settings.CirisSettings, ciris_settings.ENV_VARS),
    ("stripe", stripe_settings.StripeSettings, stripe_settings.ENV_VARS),
)


def configuration_page() -> str:
    parts = [
        "# Configuration reference",
        "",
        "Generated from the code (`ciris_billing_proxy.config` and the providers' settings models) each "
        "time the site is built. `BillingConfig(...)` built in Python reads nothing from the environment; "
        "`BillingConfig.from_env()` reads the variables below, and keyword arguments win over them. "
        "An unset or empty variable means the default. Lists are comma-separated.",
        "",
        "## BillingConfig",
        "",
        settings_table(BillingConfig, _env_for("top"), skip=("jwt",)),
        "",
        "## BillingConfig.jwt",
        "",
        settings_table(JWTConfig, _env_for("jwt"), prefix="jwt."),
        "",
        "## Provider settings",
        "",
        "A provider reads its own variables; `BillingConfig.provider_options` (or `serve "
        "--provider-option KEY=VALUE`) win over them.",
    ]
    for name, model, env in PROVIDER_SETTINGS:
        field_env = {field: var for var, field in env.items()}
        parts += ["", f"### `{name}`", "", settings_table(model, field_env)]
    return "\n".join(parts) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}`"
    if action.metavar:
        names += f" `{action.metavar}`"
    default = action.default
    shown = (
        ""
        if default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._VersionAction)
        else f"`{default}`"
    )
    help_text = (action.help or "").replace("%(prog)s", "ciris-billing-proxy")
    return f"| {_cell(names)} | {_cell(shown)} | {_cell(help_text)} |"


def cli_page(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    parts = [
        "# Command-line reference",
        "",
        "Generated from the `argparse` parsers of `ciris-billing-proxy` each time the site is built; "
        "`ciris-billing-proxy COMMAND --help` prints the same.",
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
    ]
    for name, sub in _subcommands(parser).items():
        parts += ["", f"## `ciris-billing-proxy {name}`", "", sub.description or "", ""]
        parts += ["```text", sub.format_usage().strip(), "```", ""]
        rows = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        nested = _subcommands(sub)
        if rows:
            parts += ["| Option | Default | Meaning |", "|---|---|---|", *(_option_row(a) for a in rows)]
        for inner_name, inner in nested.items():
            parts += ["", f"### `ciris-billing-proxy {name} {inner_name}`", "", inner.description or ""]
            inner_rows = [a for a in inner._actions if not isinstance(a, argparse._HelpAction)]
            if inner_rows:
                parts += ["", "| Option | Default | Meaning |", "|---|---|---|"]
                parts += [_option_row(a) for a in inner_rows]
    return "\n".join(parts) + "\n"


def _model_name(content: Mapping[str, Any] | None) -> str:
    if not content:
        return ""
    for media_type, body in content.items():
        ref = body.get("schema", {}).get("$ref", "")
        return f"`{ref.rsplit('/', 1)[-1]}`" if ref else f"`{media_type}`"
    return ""


def http_page() -> str:
    document = openapi_document(DEFAULT_PREFIX, DEFAULT_LOGIN_PATH)
    parts = [
        "# HTTP API reference",
        "",
        "Generated from the OpenAPI 3.1 document the server itself serves at "
        f"`{DEFAULT_PREFIX}/openapi.json` (default prefix and login path; `ciris-billing-proxy openapi` "
        'prints it). Every error body is `{"detail": "..."}`.',
    ]
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            parts += ["", f"## `{method.upper()} {path}`", "", op.get("summary", "")]
            if op.get("description"):
                parts += ["", op["description"]]
            details = []
            if "requestBody" in op:
                details.append(f"Body: {_model_name(op['requestBody'].get('content'))}")
            if op.get("security") == []:
                details.append("No token needed.")
            for param in op.get("parameters", []):
                details.append(f"{param['in'].capitalize()} parameter `{param['name']}`")
            if details:
                parts += ["", "; ".join(details) + "."]
            parts += ["", "| Status | Body | When |", "|---|---|---|"]
            for status, response in op["responses"].items():
                body = _model_name(response.get("content"))
                parts.append(f"| {status} | {body} | {_cell(response['description'])} |")
    return "\n".join(parts) + "\n"


def pages() -> dict[str, str]:
    """The generated pages, by file name under `reference/`."""
    return {"configuration.md": configuration_page(), "cli.md": cli_page(), "http-api.md": http_page()}
