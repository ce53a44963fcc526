"""The admin routes over real HTTP: roles from the token, grants and corrections kept with who, why
and when (the journal and the audit trail), refusals that change nothing, and bad input on every
route answered with its status and a JSON `detail`; the `credits` command does the same from a shell."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ciris_billing_proxy.client import BillingAPIError, BillingClient, ForbiddenError
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.cli import main

from .conftest import ClientFactory, make_config
from .default_paths import CREDITS

ADMIN = "/v1/api/billing/admin"
ANN_CREDITS, ANN_GRANTS, AUDIT = f"{ADMIN}/users/ann/credits", f"{ADMIN}/users/ann/grants", f"{ADMIN}/audit"


@pytest.fixture
async def setup(make_client: ClientFactory, tmp_path: Path) -> tuple[Any, TokenFactory]:
    config = make_config(tmp_path, provider_options={"database": ":memory:", "free_uses": 3})
    return await make_client(config), TokenFactory(config)


async def test_a_grant_and_a_correction_are_kept_with_who_why_and_when(
    setup: tuple[Any, TokenFactory], caplog: pytest.LogCaptureFixture
) -> None:
    client, tokens = setup
    root, ann = tokens.headers("root", role="admin"), tokens.headers("ann")
    caplog.set_level(logging.INFO, logger="ciris_billing_proxy.audit")
    gift = {"amount": 10, "kind": "promotional", "reason": "compensation", "note": "outage of May 2"}
    granted = await client.post(ANN_GRANTS, json=gift, headers={**root, "Idempotency-Key": "comp-1"})
    assert granted.status == 200
    body = await granted.json()
    assert (body["amount"], body["grant"]["reason"], body["grant"]["actor"]) == (
        10,
        "compensation",
        "local:root",
    )
    again = await (
        await client.post(ANN_GRANTS, json=gift, headers={**root, "Idempotency-Key": "comp-1"})
    ).json()
    assert (again["replayed"], again["grant"]["grant_id"]) == (True, body["grant"]["grant_id"])
    credits = await (await client.get(CREDITS, headers=ann)).json()
    assert (credits["credits_remaining"], credits["free_uses_remaining"]) == (10, 3)
    correction = {"amount": -4, "reason": "correction", "note": "granted twice by mistake"}
    taken = await client.post(ANN_GRANTS, json=correction, headers=root)
    assert (await taken.json())["amount"] == -4
    assert (await (await client.get(CREDITS, headers=ann)).json())["credits_remaining"] == 6

    audit = await (await client.get(AUDIT, params={"user_id": "ann"}, headers=root)).json()
    lines = [(e["kind"], e["amount"], e["reason"], e["note"], e["actor"]) for e in audit["entries"]]
    assert lines == [
        ("clawback", -4, "correction", "granted twice by mistake", "local:root"),
        ("grant", 10, "compensation", "outage of May 2", "local:root"),
    ]
    assert all(e["created_at"] for e in audit["entries"])
    only_grants = await (await client.get(AUDIT, params={"kind": "grant"}, headers=root)).json()
    assert only_grants["total_count"] == 1
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ciris_billing_proxy.audit"]
    adjusted = [
        (e["user"], e["outcome"], e["amount"], e["reference"])
        for e in events
        if e["event"] == "credit_adjusted"
    ]
    assert adjusted == [
        ("local:ann", "compensation", 10, "by local:root"),
        ("local:ann", "correction", -4, "by local:root"),
    ]
    shown = await (await client.get(ANN_CREDITS, headers=root)).json()
    assert shown["balance"] == {
        "free_uses_remaining": 3,
        "credits_remaining": 6,
        "total_uses": 0,
        "next_expiry_at": None,
    }
    assert [(g["kind"], g["amount"], g["remaining"], g["source"]) for g in shown["grants"]] == [
        ("promotional", 10, 6, "admin"),
        ("free", 3, 3, "signup"),
    ]


async def test_a_correction_beyond_the_balance_is_refused_and_changes_nothing(
    setup: tuple[Any, TokenFactory],
) -> None:
    client, tokens = setup
    root = tokens.headers("root", role="ADMIN")
    await client.post(ANN_GRANTS, json={"amount": 2, "kind": "paid", "reason": "goodwill"}, headers=root)
    refused = await client.post(ANN_GRANTS, json={"amount": -6, "reason": "fraud"}, headers=root)
    assert refused.status == 409
    assert (await refused.json())["detail"] == (
        "Correction refused: it would take the balance below zero (balance 5)"
    )
    credits = await (await client.get(CREDITS, headers=tokens.headers("ann"))).json()
    assert (credits["credits_remaining"], credits["free_uses_remaining"]) == (2, 3)
    # Of one kind only: the paid credit.
    assert (
        await client.post(ANN_GRANTS, json={"amount": -3, "kind": "paid", "reason": "refund"}, headers=root)
    ).status == 409
    reused = await client.post(
        ANN_GRANTS, json={"amount": -1, "reason": "refund"}, headers={**root, "Idempotency-Key": "k"}
    )
    assert reused.status == 200
    clash = await client.post(
        ANN_GRANTS, json={"amount": 1, "reason": "goodwill"}, headers={**root, "Idempotency-Key": "k"}
    )
    assert clash.status == 409


async def test_an_expiring_grant_shows_its_expiry(setup: tuple[Any, TokenFactory]) -> None:
    client, tokens = setup
    root = tokens.headers("root", role="admin")
    body = {"amount": 5, "reason": "promotion", "expires_at": "2099-01-01T00:00:00Z"}
    assert (await client.post(ANN_GRANTS, json=body, headers=root)).status == 200
    credits = await (await client.get(CREDITS, headers=tokens.headers("ann"))).json()
    assert credits["next_expiry_at"] == "2099-01-01T00:00:00+00:00"


async def test_every_admin_route_is_for_admins_only(
    setup: tuple[Any, TokenFactory], caplog: pytest.LogCaptureFixture
) -> None:
    client, tokens = setup
    caplog.set_level(logging.INFO, logger="ciris_billing_proxy.audit")
    for headers in (
        tokens.headers("ann"),
        tokens.headers("ann", role="observer"),
        tokens.headers("ann", role="ADMINS"),
    ):
        for method, path in (("GET", ANN_CREDITS), ("POST", ANN_GRANTS), ("GET", AUDIT)):
            resp = await client.request(
                method, path, json={"amount": 1, "reason": "goodwill"}, headers=headers
            )
            assert resp.status == 403, (method, path)
            assert (await resp.json()) == {"detail": "This route is for administrators"}
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ciris_billing_proxy.audit"]
    refused = [(e["event"], e["user"], e["outcome"], e["reference"]) for e in events]
    assert refused == 3 * [
        ("admin_refused", "local:ann", "refused", "GET /v1/api/billing/admin/users/ann/credits"),
        ("admin_refused", "local:ann", "refused", "POST /v1/api/billing/admin/users/ann/grants"),
        ("admin_refused", "local:ann", "refused", "GET /v1/api/billing/admin/audit"),
    ]
    for method, path in (
        ("GET", ANN_CREDITS),
        ("POST", ANN_GRANTS),
        ("GET", AUDIT),
        ("GET", "/v1/api/billing/usage"),
    ):
        resp = await client.request(method, path)
        assert resp.status == 401
        assert "detail" in await resp.json()


@pytest.mark.parametrize(
    ("send", "status", "detail"),
    [
        ({"data": b"{"}, 400, "Malformed JSON body"),
        ({"data": b""}, 400, "Request body is empty; send a JSON object"),
        ({"json": [1]}, 422, "Request body must be a JSON object"),
        ({"json": {"amount": "5", "reason": "goodwill"}}, 422, "amount"),
        ({"json": {"amount": 0, "reason": "goodwill"}}, 422, "amount"),
        ({"json": {"amount": 5.5, "reason": "goodwill"}}, 422, "amount"),
        ({"json": {"amount": 10**10, "reason": "goodwill"}}, 422, "amount"),
        ({"json": {"amount": 5, "reason": "because"}}, 422, "reason"),
        ({"json": {"amount": 5}}, 422, "reason"),
        ({"json": {"amount": 5, "reason": "goodwill", "kind": "gold"}}, 422, "kind"),
        ({"json": {"amount": 5, "reason": "goodwill", "expires_at": "soon"}}, 422, "expires_at"),
        ({"json": {"amount": 5, "reason": "goodwill", "expires_at": "2001-01-01T00:00:00Z"}}, 422, "future"),
        ({"json": {"amount": -5, "reason": "refund", "expires_at": "2099-01-01"}}, 422, "expires_at"),
        ({"json": {"amount": 5, "reason": "goodwill", "note": "x" * 501}}, 422, "note"),
        ({"json": {"amount": 5, "reason": "goodwill", "note": "x" * 20_000}}, 413, ""),
        (
            {"json": {"amount": 5, "reason": "goodwill"}, "headers": {"Idempotency-Key": "a b"}},
            400,
            "Idempotency-Key",
        ),
        ({"json": {"amount": 5, "reason": "goodwill"}, "params": {"namespace": "a b"}}, 422, "namespace"),
    ],
)
async def test_bad_grants_are_refused_with_a_detail_and_change_nothing(
    setup: tuple[Any, TokenFactory], send: dict[str, Any], status: int, detail: str
) -> None:
    client, tokens = setup
    root = tokens.headers("root", role="admin")
    headers = {**root, **send.pop("headers", {})}
    resp = await client.post(ANN_GRANTS, headers=headers, **send)
    assert resp.status == status
    assert detail in (await resp.json())["detail"]
    assert (await client.get(ANN_CREDITS, headers=root)).status == 404  # still no records of ann


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        (ANN_CREDITS, {}, 404),
        (f"{ADMIN}/users/{'x' * 300}/credits", {}, 422),
        (ANN_CREDITS, {"namespace": " "}, 422),
        (AUDIT, {"since": "last week"}, 422),
        (AUDIT, {"kind": "refund"}, 422),
        (AUDIT, {"limit": "0"}, 422),
        (AUDIT, {"limit": "1000"}, 422),
        (AUDIT, {"offset": "-1"}, 422),
    ],
)
async def test_bad_admin_reads_are_refused_with_a_detail(
    setup: tuple[Any, TokenFactory], path: str, params: dict[str, str], status: int
) -> None:
    client, tokens = setup
    resp = await client.get(path, params=params, headers=tokens.headers("root", role="admin"))
    assert resp.status == status
    assert isinstance((await resp.json())["detail"], str)


async def test_a_provider_without_a_ledger_answers_404(make_client: ClientFactory, tmp_path: Path) -> None:
    config = make_config(tmp_path, provider="unlimited", provider_options={})
    client = await make_client(config)
    root = TokenFactory(config).headers("root", role="admin")
    for method, path in (
        ("GET", ANN_CREDITS),
        ("POST", ANN_GRANTS),
        ("GET", AUDIT),
        ("GET", "/v1/api/billing/usage"),
    ):
        resp = await client.request(method, path, json={"amount": 1, "reason": "goodwill"}, headers=root)
        assert resp.status == 404
        assert (await resp.json()) == {"detail": "Not offered by this agent's credit provider"}


def test_the_credits_command_grants_corrects_shows_and_audits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--data-dir", str(tmp_path), "--provider-option", "free_uses=2"]
    assert main(["credits", "grant", "ann", "5", "--reason", "goodwill", "--note", "welcome", *store]) == 0
    granted = json.loads(capsys.readouterr().out)
    assert (granted["amount"], granted["grant"]["actor"][:4]) == (5, "cli:")
    assert main(["credits", "adjust", "ann", "-9", "--reason", "correction", *store]) == 1
    assert "below zero (balance 7)" in capsys.readouterr().out
    assert main(["credits", "adjust", "ann", "-2", "--reason", "correction", *store]) == 0
    capsys.readouterr()
    assert main(["credits", "show", "ann", *store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["balance"]["credits_remaining"] == 3
    assert main(["credits", "audit", "--user", "ann", *store]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["amount"], e["reason"]) for e in audit["entries"]] == [
        ("clawback", -2, "correction"),
        ("grant", 5, "goodwill"),
    ]
    assert main(["credits", "show", "nobody", *store]) == 1
    assert main(["credits", "grant", "ann", "-1", "--reason", "goodwill", *store]) == 2
    with pytest.raises(SystemExit):
        main(["credits", "grant", "ann", "1", "--reason", "because", *store])


async def test_the_python_client_reads_usage_and_drives_the_admin_routes(
    setup: tuple[Any, TokenFactory],
) -> None:
    client, tokens = setup
    base = str(client.make_url(""))
    async with BillingClient(base, token=tokens.token("root", role="admin")) as admin:
        granted = await admin.admin_grant("ann", 4, "goodwill", kind="paid", idempotency_key="g-1")
        assert (granted.amount, granted.balance.credits_remaining) == (4, 4)
        shown = await admin.admin_user_credits("ann")
        assert [g.kind for g in shown.grants] == ["paid", "free"]
        audit = await admin.admin_audit(user_id="ann", kind="grant")
        assert [(e.amount, e.reason) for e in audit.entries] == [(4, "goodwill")]
        with pytest.raises(BillingAPIError) as refused:
            await admin.admin_grant("ann", -99, "correction")
        assert refused.value.status == 409
    async with BillingClient(base, token=tokens.token("ann")) as ann:
        assert (await ann.get_usage(group_by="product")).totals == []
        with pytest.raises(ForbiddenError):
            await ann.admin_audit()


async def test_a_grant_key_used_again_for_another_grant_is_refused(setup: tuple[Any, TokenFactory]) -> None:
    client, tokens = setup
    root, ann = tokens.headers("root", role="admin"), tokens.headers("ann")
    keyed = {**root, "Idempotency-Key": "g1"}
    first = {"amount": 5, "reason": "goodwill", "note": "sorry"}
    assert (await client.post(ANN_GRANTS, json=first, headers=keyed)).status == 200
    replay = await client.post(ANN_GRANTS, json=first, headers=keyed)
    assert (await replay.json())["replayed"] is True
    others = (
        {"amount": 7, "reason": "goodwill"},
        {**first, "kind": "paid"},
        {**first, "reason": "promotion"},
    )
    for other in others:
        refused = await client.post(ANN_GRANTS, json=other, headers=keyed)
        assert refused.status == 409, other
        assert "Idempotency-Key" in (await refused.json())["detail"]
    assert (await (await client.get(CREDITS, headers=ann)).json())["credits_remaining"] == 5


async def test_credit_that_expired_is_not_shown_from_the_cache(setup: tuple[Any, TokenFactory]) -> None:
    """The credit cache keeps a reply no longer than its soonest expiry: once a grant expires,
    `GET /credits` says so at once, not a cache lifetime later."""
    client, tokens = setup
    root, ann = tokens.headers("root", role="admin"), tokens.headers("ann")
    expires = math.ceil(time.time()) + 2
    at = datetime.fromtimestamp(expires, UTC).isoformat()
    gift = {"amount": 2, "reason": "promotion", "expires_at": at}
    assert (await client.post(ANN_GRANTS, json=gift, headers=root)).status == 200
    shown = await (await client.get(CREDITS, headers=ann)).json()
    assert (shown["credits_remaining"], shown["next_expiry_at"]) == (2, at)
    await asyncio.sleep(expires - time.time() + 0.3)
    shown = await (await client.get(CREDITS, headers=ann)).json()
    assert shown["credits_remaining"] == 0
    assert "next_expiry_at" not in shown
