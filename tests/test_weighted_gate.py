"""`@credit_gate(cost=...)` and `@credit_gate(reserve=...)` over real HTTP on the `simple` provider:
what each request takes, what a reservation keeps, what a failure gives back, usage attached and
totalled by `GET /usage`; a gate the provider cannot serve stops the app at startup; the demo's
demo-only `"cost"`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ciris_billing_proxy import BillingConfig, ConfigError, credit_gate, setup_billing
from ciris_billing_proxy.gate import billing_spend
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.demo import create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .conftest import ClientFactory, make_config
from .default_paths import CREDITS, TRANSACTIONS

USAGE = "/v1/api/billing/usage"


def weighted_routes(app: web.Application) -> None:
    @credit_gate(cost=3)
    async def three(request: web.Request) -> web.Response:
        billing_spend(request).usage(model="small", input_tokens=10, output_tokens=5)
        return web.json_response({"ok": True})

    async def cost_of(request: web.Request) -> int:
        return int(request.query.get("cost", "1"))

    @credit_gate(cost=cost_of)
    async def priced(request: web.Request) -> web.Response:
        if request.query.get("fail"):
            raise web.HTTPBadGateway(text="model down")
        return web.json_response({"ok": True})

    @credit_gate(reserve=lambda request: 10)
    async def chat(request: web.Request) -> web.Response:
        spend = billing_spend(request)
        if "settle" in request.query:
            await spend.settle(
                int(request.query["settle"]), model="big", input_tokens=1000, output_tokens=200
            )
        if request.query.get("fail"):
            return web.json_response({"detail": "failed after settling"}, status=500)
        return web.json_response({"ok": True})

    app.router.add_post("/three", three)
    app.router.add_post("/priced", priced)
    app.router.add_post("/chat", chat)


def _config(tmp_path: Path, free_uses: int) -> BillingConfig:
    return make_config(tmp_path, provider_options={"database": ":memory:", "free_uses": free_uses})


async def left(client: Any, auth: dict[str, str]) -> tuple[int, int]:
    body = await (await client.get(CREDITS, headers=auth)).json()
    return body["free_uses_remaining"], body["total_uses"]


async def test_a_cost_is_taken_whole_or_refused(make_client: ClientFactory, tmp_path: Path) -> None:
    config = _config(tmp_path, 10)
    client = await make_client(config, host=weighted_routes)
    auth = TokenFactory(config).headers("ann")
    assert (await client.post("/three", headers=auth)).status == 200
    assert await left(client, auth) == (7, 3)
    assert (await client.post("/priced", params={"cost": "5"}, headers=auth)).status == 200
    refused = await client.post("/priced", params={"cost": "3"}, headers=auth)
    assert refused.status == 402
    # Two uses are left: the reply says there is not enough, not that there is none.
    assert (await refused.json())["detail"] == {
        "error": "insufficient_credit",
        "message": "You do not have enough credit for this request.",
        "reason": "Not enough credit for a cost of 3",
    }
    assert await left(client, auth) == (2, 8)
    assert (await client.post("/priced", params={"cost": "2", "fail": "1"}, headers=auth)).status == 502
    assert await left(client, auth) == (2, 8)
    assert (await client.post("/priced", params={"cost": "0"}, headers=auth)).status == 200  # free
    assert await left(client, auth) == (2, 8)


async def test_a_weighted_give_back_is_audited_at_what_the_spend_took(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(_config(tmp_path, 10), host=weighted_routes)
    auth = TokenFactory(_config(tmp_path, 10)).headers("ann")
    caplog.set_level(logging.INFO, logger="ciris_billing_proxy.audit")
    assert (await client.post("/priced", params={"cost": "4", "fail": "1"}, headers=auth)).status == 502
    assert await left(client, auth) == (10, 0)
    audited = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ciris_billing_proxy.audit"]
    moved = [(e["event"], e["amount"]) for e in audited if e["event"] in ("spend", "give_back")]
    assert moved == [("spend", 4), ("give_back", 4)]


async def test_a_reservation_keeps_what_the_handler_settles(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ciris_billing_proxy.audit")
    config = _config(tmp_path, 30)
    client = await make_client(config, host=weighted_routes)
    auth = TokenFactory(config).headers("ann")
    assert (await client.post("/chat", params={"settle": "4"}, headers=auth)).status == 200
    assert await left(client, auth) == (26, 4)
    audited = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ciris_billing_proxy.audit"]
    assert [(e["event"], e["amount"]) for e in audited] == [("spend", 10), ("settle", 4)]
    assert (await client.post("/chat", headers=auth)).status == 200  # not settled: all of it kept
    assert await left(client, auth) == (16, 14)
    assert (await client.post("/chat", params={"settle": "2", "fail": "1"}, headers=auth)).status == 500
    assert await left(client, auth) == (16, 14)  # a failure gives everything back
    assert (await client.post("/chat", params={"settle": "99"}, headers=auth)).status == 200
    assert await left(client, auth) == (6, 24)  # never more than the reservation
    assert (await client.post("/chat", headers=auth)).status == 402  # 10 cannot be reserved


async def test_concurrent_reservations_keep_exactly_what_was_settled(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    config = _config(tmp_path, 100)
    client = await make_client(config, host=weighted_routes)
    auth = TokenFactory(config).headers("ann")

    async def chat(n: int) -> int:
        params = {"settle": str(n % 7)} | ({"fail": "1"} if n % 5 == 0 else {})
        resp = await client.post("/chat", params=params, headers=auth)
        return n % 7 if resp.status == 200 else 0

    kept = await asyncio.gather(*(chat(n) for n in range(40)))
    assert await left(client, auth) == (100 - sum(kept), sum(kept))


async def test_usage_is_kept_with_its_spend_and_totalled(make_client: ClientFactory, tmp_path: Path) -> None:
    config = _config(tmp_path, 100)
    client = await make_client(config, host=weighted_routes)
    auth = TokenFactory(config).headers("ann")
    for path, params in (("/three", {}), ("/three", {}), ("/chat", {"settle": "4"}), ("/priced", {})):
        assert (await client.post(path, params=params, headers=auth)).status == 200
    assert (await client.post("/chat", params={"settle": "3", "fail": "1"}, headers=auth)).status == 500
    by_model = await (await client.get(USAGE, params={"group_by": "model"}, headers=auth)).json()
    assert by_model["group_by"] == "model"
    assert by_model["totals"] == [
        {"key": "", "spends": 1, "credits": 1, "input_tokens": 0, "output_tokens": 0},
        {"key": "big", "spends": 1, "credits": 4, "input_tokens": 1000, "output_tokens": 200},
        {"key": "small", "spends": 2, "credits": 6, "input_tokens": 20, "output_tokens": 10},
    ]
    by_day = await (await client.get(USAGE, headers=auth)).json()
    assert [(t["spends"], t["credits"]) for t in by_day["totals"]] == [(4, 11)]
    assert by_day["totals"][0]["key"] == by_day["until"][:10]
    page = await (await client.get(TRANSACTIONS, headers=auth)).json()
    settled = [t for t in page["transactions"] if t.get("transaction_type") == "reserve"]
    assert {"model": "big", "input_tokens": 1000, "output_tokens": 200} in [
        t.get("metadata") for t in settled
    ]
    other = await (await client.get(USAGE, headers=TokenFactory(config).headers("bob"))).json()
    assert other["totals"] == []
    backwards = await client.get(USAGE, params={"from": "2026-02-01", "to": "2026-01-01"}, headers=auth)
    assert (await backwards.json())["totals"] == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-45"}, "to"),
    ],
)
async def test_bad_usage_queries_are_422(
    make_client: ClientFactory, tmp_path: Path, params: dict[str, str], detail: str
) -> None:
    config = _config(tmp_path, 10)
    client = await make_client(config)
    resp = await client.get(USAGE, params=params, headers=TokenFactory(config).headers("ann"))
    assert resp.status == 422
    assert detail in (await resp.json())["detail"]


async def test_a_weighted_gate_on_a_provider_without_weighted_spends_stops_the_app(tmp_path: Path) -> None:
    app = web.Application()
    weighted_routes(app)
    setup_billing(app, make_config(tmp_path, provider="unlimited", provider_options={}), environ={})
    runner = web.AppRunner(app)
    try:
        with pytest.raises(ConfigError, match="POST /three: a @credit_gate with a cost"):
            await runner.setup()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("options", "error"),
    [({"cost": 0}, ValueError), ({"cost": True}, TypeError), ({"cost": 2, "reserve": 3}, ValueError)],
)
def test_bad_gate_options_fail_when_decorating(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        credit_gate(**options)


async def test_the_demo_charges_the_cost_its_request_asks(aiohttp_client: Any, tmp_path: Path) -> None:
    config = _config(tmp_path, 20)
    users = UserStore()
    users.add("ann", "pw-ann-123456")
    client = await aiohttp_client(create_demo_app(config, users, environ={}))
    auth = TokenFactory(config).headers("ann")
    interact = "/v1/agent/interact"
    resp = await client.post(interact, params={"cost": "7"}, json={"message": "hi"}, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["free_uses_remaining"] == 13
    resp = await client.post(interact, json={"message": "hi"}, headers=auth)
    assert (await resp.json())["free_uses_remaining"] == 12
    for cost in ("11", "0", "three", "-1"):
        resp = await client.post(interact, params={"cost": cost}, json={"message": "hi"}, headers=auth)
        assert resp.status == 422
        assert "cost" in (await resp.json())["detail"]
    assert (await client.post(interact, params={"cost": "5"}, data=b"{", headers=auth)).status == 400
    assert await left(client, auth) == (12, 8)


async def test_the_demo_takes_the_cost_in_its_body_too(aiohttp_client: Any, tmp_path: Path) -> None:
    """`{"cost": N}` is charged like `?cost=N` when the body comes whole; a body streamed in chunks
    is read after the use is taken, so a cost in it that differs is refused and the use given back."""
    config = _config(tmp_path, 20)
    users = UserStore()
    users.add("ann", "pw-ann-123456")
    client = await aiohttp_client(create_demo_app(config, users, environ={}))
    auth = TokenFactory(config).headers("ann")
    interact = "/v1/agent/interact"
    resp = await client.post(interact, json={"message": "hi", "cost": 4}, headers=auth)
    assert resp.status == 200
    assert (await resp.json())["free_uses_remaining"] == 16
    for bad in (11, 0, "3", True, None):
        resp = await client.post(interact, json={"message": "hi", "cost": bad}, headers=auth)
        assert resp.status == 422, bad
        assert "cost" in (await resp.json())["detail"]
    for bad in (4.0, [4], "Infinity"):
        resp = await client.post(interact, json={"message": "hi", "cost": bad}, headers=auth)
        assert resp.status == 422, bad
    # Read as before pydantic's JSON parser was tried first: UTF-16, extra fields, NaN (not a cost).
    utf16 = json.dumps({"message": "hi", "cost": 1, "agent": "x"}).encode("utf-16")
    assert (await client.post(interact, data=utf16, headers=auth)).status == 200
    resp = await client.post(interact, data=b'{"message": "hi", "cost": NaN}', headers=auth)
    assert resp.status == 422
    both = {"message": "hi", "cost": 2}
    assert (await client.post(interact, params={"cost": "3"}, json=both, headers=auth)).status == 422
    assert (await client.post(interact, params={"cost": "2"}, json=both, headers=auth)).status == 200

    async def streamed(body: bytes) -> AsyncIterator[bytes]:
        yield body

    resp = await client.post(interact, data=streamed(json.dumps(both).encode()), headers=auth)
    assert resp.status == 422
    assert "?cost=N" in (await resp.json())["detail"]
    one = json.dumps({"message": "hi"}).encode()
    assert (await client.post(interact, data=streamed(one), headers=auth)).status == 200
    assert await left(client, auth) == (20 - 4 - 1 - 2 - 1, 4 + 1 + 2 + 1)


async def test_the_configured_threshold_reaches_the_ledger_and_a_crossing_is_one_event(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, low_balance_threshold=4, provider_options={"database": ":memory:", "free_uses": 10}
    )
    client = await make_client(config, host=weighted_routes)
    auth = TokenFactory(config).headers("ann")
    for _ in range(3):
        assert (await client.post("/three", headers=auth)).status == 200  # 10 -> 7 -> 4 -> 1
    ledger = client.app[SERVICE_KEY].provider.credit_ledger
    rows = await ledger.engine.run(
        lambda conn: conn.execute("SELECT kind, data FROM billing_events").fetchall()
    )
    assert [(kind, json.loads(data)["balance_after"]) for kind, data in rows] == [("balance.low", 4)]
