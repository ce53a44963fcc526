"""The UI kit's files under `{prefix}/ui/`: public, cacheable, typed, and nothing else is reachable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.config import ConfigError
from ciris_billing_proxy.testing import TokenFactory

from .conftest import SECRET, ClientFactory, make_config
from .default_paths import BILLING, CAPABILITIES, CREDITS

UI = f"{BILLING}/ui"
ROOT = Path(__file__).resolve().parents[1]
PACKAGE_UI = ROOT / "ciris_billing_proxy" / "ui"


def read(name: str) -> str:
    return (PACKAGE_UI / name).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("billing.js", "text/javascript"), ("billing.d.ts", "application/typescript")],
)
async def test_served_without_a_token_with_cache_headers(
    billing_client: Any, name: str, content_type: str
) -> None:
    resp = await billing_client.get(f"{UI}/{name}")
    assert resp.status == 200
    assert resp.content_type == content_type
    assert await resp.read() == (PACKAGE_UI / name).read_bytes()
    assert resp.headers["Cache-Control"] == "public, max-age=300"
    assert resp.headers["Access-Control-Allow-Origin"] == "*"  # module scripts are fetched with CORS
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    etag = resp.headers["ETag"]
    again = await billing_client.get(f"{UI}/{name}", headers={"If-None-Match": f'"other", W/{etag}'})
    assert again.status == 304
    assert again.headers["ETag"] == etag
    assert await again.read() == b""
    assert (await billing_client.get(f"{UI}/{name}", headers={"If-None-Match": '"other"'})).status == 200
    head = await billing_client.head(f"{UI}/{name}")
    assert head.status == 200
    assert head.headers["ETag"] == etag


@pytest.mark.parametrize(
    "path",
    [
        "fake-stripe.js",  # only `serve --fake-backend` serves it
        "demo.html",
        "__init__.py",
        "missing.js",
        "a/billing.js",
        "%2e%2e%2f__init__.py",
        "..%2f..%2fconfig.py",
        "",
    ],
)
async def test_anything_else_is_a_json_404_without_a_token(billing_client: Any, path: str) -> None:
    resp = await billing_client.get(f"{UI}/{path}")
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not Found"}


async def test_only_the_files_are_public(billing_client: Any, tokens: TokenFactory) -> None:
    assert (await billing_client.get(CREDITS)).status == 401
    assert (await billing_client.get(CAPABILITIES)).status == 401
    assert (await billing_client.post(f"{UI}/billing.js")).status == 401
    resp = await billing_client.post(f"{UI}/billing.js", headers=tokens.headers())
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET,HEAD"


async def test_served_without_the_sub_app_too(make_client: ClientFactory, config: BillingConfig) -> None:
    client = await make_client(config, subapp=False)
    resp = await client.get(f"{UI}/billing.js")
    assert resp.status == 200
    assert (await client.get(f"{UI}/nothing.js")).status == 404
    assert (await client.get(CREDITS)).status == 401


async def test_a_config_can_turn_them_off(
    make_client: ClientFactory, tmp_path: Path, tokens: TokenFactory
) -> None:
    client = await make_client(make_config(tmp_path, serve_ui=False))
    assert (await client.get(f"{UI}/billing.js")).status == 401
    resp = await client.get(f"{UI}/billing.js", headers=tokens.headers())
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("0", False), ("true", True), ("", True)])
def test_the_environment_turns_them_off(raw: str, expected: bool) -> None:
    env = {"CIRIS_JWT_SECRET": SECRET, "CIRIS_BILLING_SERVE_UI": raw}
    assert BillingConfig.from_env(env).serve_ui is expected


def test_a_bad_environment_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="serve_ui"):
        BillingConfig.from_env({"CIRIS_JWT_SECRET": SECRET, "CIRIS_BILLING_SERVE_UI": "maybe"})


def test_the_declarations_cover_every_export() -> None:
    exported = set(re.findall(r"^export (?:class|function|const) (\w+)", read("billing.js"), re.M))
    declared = set(re.findall(r"^export declare (?:class|function|const) (\w+)", read("billing.d.ts"), re.M))
    assert exported == declared
    assert {"BillingClient", "CirisBillingElement", "AuthenticationError", "PurchaseTimeout"} <= exported


def test_the_documented_states_are_the_elements() -> None:
    states = re.search(r"export const STATES = Object\.freeze\(\[(.*?)\]\)", read("billing.js"), re.S)
    assert states is not None
    assert re.findall(r'"([a-z-]+)"', states.group(1)) == [
        "loading",
        "ready",
        "no-credit",
        "disabled",
        "paying",
        "processing",
        "succeeded",
        "failed",
        "error",
    ]


def test_the_docs_show_every_screenshot() -> None:
    taken = {path.name for path in (ROOT / "docs" / "images").glob("*.png")}
    page = (ROOT / "docs" / "ui-kit.md").read_text(encoding="utf-8")
    assert set(re.findall(r"\(images/([\w-]+\.png)\)", page)) == taken
    assert len(taken) == 9  # seven states, and two at a phone's width
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert set(re.findall(r"\(docs/images/([\w-]+\.png)\)", readme)) <= taken
