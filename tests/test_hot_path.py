"""The hot paths stay cheap, counted on the demo agent `serve` runs, over real HTTP.

A cached `GET /credits` makes no database round trip and schedules no task of its own, and is
answered by its cached path (`routes.CachedCredits`) with the guarded path's promises kept; a gated
`POST /v1/agent/interact` makes one round trip to the ledger (its spend, which also tells the
credit left). Counted, never timed: the engine's `run` and the loop's task factory are wrapped.
The give-back outbox's rounds (one at startup, then every `period` seconds, whatever the requests)
are background work, not the requests': its store's round trips are left out.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from ciris_billing_proxy import BillingConfig
from ciris_billing_proxy.auth import TokenVerifier
from ciris_billing_proxy.id_token import GOOGLE_HEADER
from ciris_billing_proxy.keys import SERVICE_KEY
from ciris_billing_proxy.providers.simple import SimpleProvider
from ciris_billing_proxy.store import SQLiteDatabase
from ciris_billing_proxy.testing import TokenFactory
from ciris_billing_proxy.tools.cli import make_runner
from ciris_billing_proxy.tools.demo import INTERACT_PATH, create_demo_app
from ciris_billing_proxy.tools.users import UserStore

from .conftest import SECRET, ClientFactory, make_config
from .default_paths import CREDITS
from .providers import ShopProvider

T = TypeVar("T")
N = 40
#: The tasks asyncio and aiohttp start themselves: per connection (accept, the connection's loop) and
#: per request (Python 3.11; later versions start that one eagerly, outside the task factory).
SERVER_TASKS = frozenset(
    {"BaseSelectorEventLoop._accept_connection2", "RequestHandler.start", "RequestHandler._handle_request"}
)


class Counted:
    """Database round trips by engine, and tasks created by coroutine name, from `start()` on."""

    def __init__(self) -> None:
        self.round_trips: list[SQLiteDatabase] = []
        self.tasks: list[str] = []

    def start(self) -> None:
        self.round_trips.clear()
        self.tasks.clear()

    def ours(self) -> list[str]:
        return [name for name in self.tasks if name not in SERVER_TASKS]

    def requests_round_trips(self, app: web.Application) -> list[SQLiteDatabase]:
        """The round trips but the outbox's (see the module docstring)."""
        outbox = app[SERVICE_KEY].outbox
        background = None if outbox is None else outbox.store.engine
        return [engine for engine in self.round_trips if engine is not background]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counted]:
    counts = Counted()
    run = SQLiteDatabase.run

    async def counting_run(self: SQLiteDatabase, fn: Callable[..., T]) -> T:
        counts.round_trips.append(self)
        return await run(self, fn)

    monkeypatch.setattr(SQLiteDatabase, "run", counting_run)
    loop = asyncio.get_event_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        counts.tasks.append(getattr(coro, "__qualname__", type(coro).__name__))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    yield counts
    loop.set_task_factory(None)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[int, web.Application, BillingConfig]]:
    """The demo agent as `serve` runs it (its runner, SQLite files in the data directory)."""
    # No leeway: an expired token is refused within the second (`test_the_cached_path_refuses...`).
    config = make_config(
        tmp_path, jwt={"secret": SECRET, "leeway_seconds": 0}, provider_options={"free_uses": 1000}
    )
    app = create_demo_app(config, UserStore(), environ={})
    runner = make_runner(app, idle_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], app, config
    finally:
        await runner.cleanup()


def _requests(port: int, n: int, method: str, path: str, headers: dict[str, str], body: bytes | None) -> None:
    """N requests on one keep-alive connection, from a thread: the client adds no task to the loop."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(n):
            conn.request(method, path, body=body, headers=headers)
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200, reply.status
    finally:
        conn.close()


async def send(port: int, n: int, method: str, path: str, headers: dict[str, str], body: Any = None) -> None:
    raw = None if body is None else json.dumps(body).encode()
    sent = {**headers, "Content-Type": "application/json"} if raw is not None else headers
    await asyncio.get_running_loop().run_in_executor(None, _requests, port, n, method, path, sent, raw)


async def test_a_cached_credit_read_makes_no_round_trip_and_schedules_no_task(
    agent: tuple[int, web.Application, BillingConfig], counted: Counted
) -> None:
    port, app, config = agent
    headers = TokenFactory(config).headers("alice")
    counted.start()
    await send(port, 1, "GET", CREDITS, headers)  # the miss: loaded once
    assert len(counted.requests_round_trips(app)) == 1
    assert counted.ours()  # the load's task: the counting sees the package's tasks
    counted.start()
    await send(port, N, "GET", CREDITS, headers)
    assert counted.requests_round_trips(app) == []
    assert counted.ours() == []


async def test_a_cached_credit_read_is_answered_by_the_cached_path_with_every_promise_kept(
    agent: tuple[int, web.Application, BillingConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`routes.CachedCredits` answers a warm read without the guarded handler (no full token check
    runs), and still echoes or makes the request id and counts the answer under its route."""
    port, app, config = agent
    headers = TokenFactory(config).headers("alice")
    full_checks: list[str] = []
    verify_header = TokenVerifier.verify_header

    def counting(self: TokenVerifier, header: str) -> Any:
        full_checks.append(header)
        return verify_header(self, header)

    monkeypatch.setattr(TokenVerifier, "verify_header", counting)
    await send(port, 1, "GET", CREDITS, headers)  # the miss: loaded through the guarded handler
    assert len(full_checks) == 1
    requests = app[SERVICE_KEY].counts.requests
    before = dict(requests)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async with session.get(CREDITS, headers={**headers, "X-Request-ID": "sent-1"}) as reply:
            assert reply.status == 200
            assert reply.headers["X-Request-ID"] == "sent-1"
        made = set()
        for _ in range(3):
            async with session.get(CREDITS, headers=headers) as reply:
                assert reply.status == 200
                assert reply.content_type == "application/json"
                assert (await reply.json())["has_credit"] is True
                made.add(reply.headers["X-Request-ID"])
        assert len(made) == 3  # one id per request
        async with session.head(CREDITS, headers=headers) as reply:
            assert reply.status == 200
    assert len(full_checks) == 2  # the HEAD only: its route keeps the guarded handler
    grown = {key: n - before.get(key, 0) for key, n in requests.items() if n != before.get(key, 0)}
    assert sorted((route.method, status, n) for (route, status), n in grown.items()) == [  # type: ignore[attr-defined]
        ("GET", 200, 4),
        ("HEAD", 200, 1),
    ]


@pytest.mark.parametrize("how", ["revoked", "expired", "sessions ended"])
async def test_the_cached_path_refuses_a_token_at_once(
    agent: tuple[int, web.Application, BillingConfig], how: str
) -> None:
    """Revocation, expiry and a moved token epoch are checked on the cached path too: the next
    read is a 401 in JSON, with a request id."""
    port, app, config = agent
    service = app[SERVICE_KEY]
    token = TokenFactory(config).token("alice", ttl=1 if how == "expired" else 3600)
    headers = {"Authorization": f"Bearer {token}"}
    await send(port, 2, "GET", CREDITS, headers)  # cached: token and credit
    if how == "revoked":
        service.revoke_token(token)
    elif how == "expired":
        await asyncio.sleep(1.2 + config.jwt.leeway_seconds)
    else:
        await service.end_sessions(service.verifier.verify(token).key)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{CREDITS}", headers=headers) as reply,
    ):
        assert reply.status == 401
        assert "detail" in await reply.json()
        assert reply.headers["X-Request-ID"]


async def test_a_gated_interaction_makes_one_round_trip_to_the_ledger(
    agent: tuple[int, web.Application, BillingConfig], counted: Counted
) -> None:
    port, app, config = agent
    provider = app[SERVICE_KEY].provider
    assert isinstance(provider, SimpleProvider)
    headers = TokenFactory(config).headers("alice")
    await send(port, 1, "POST", INTERACT_PATH, headers, {"message": "hi"})
    counted.start()
    await send(port, N, "POST", INTERACT_PATH, headers, {"message": "hi"})
    ledger = provider.ledger.engine
    assert sum(engine is ledger for engine in counted.round_trips) == N  # the spend, and nothing more


async def test_no_middleware_layer_runs_for_a_credit_read_or_a_gated_interaction(
    agent: tuple[int, web.Application, BillingConfig],
) -> None:
    """aiohttp runs its middleware machinery (a layer per middleware and one per application on
    the way) unless no application on a request's way has a middleware: `serve`'s errors are
    bound to its routes, so none runs (a sixth of a cached read's instructions)."""
    _port, app, _config = agent
    for method, path in (("GET", CREDITS), ("POST", INTERACT_PATH)):
        match = await app.router.resolve(make_mocked_request(method, path, app=app))
        assert match.http_exception is None
        assert [a.middlewares for a in (app, *match.apps)] == [[] for _ in range(1 + len(match.apps))]


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("POST", CREDITS, 405, "GET,HEAD"),
        ("GET", INTERACT_PATH, 405, "POST"),
        ("GET", "/v1/api/billing/nothing-here", 404, None),
        ("GET", "/nothing-here", 404, None),
    ],
)
async def test_the_routes_bound_errors_answer_unknown_paths_and_methods_in_json(
    agent: tuple[int, web.Application, BillingConfig], method: str, path: str, status: int, allow: str | None
) -> None:
    """With no middleware, the catch-all routes answer what no route serves: a 405 names what the
    path allows (never a catch-all's `*`), a 404 otherwise, both JSON with a request id."""
    port, _app, config = agent
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{port}{path}", headers=TokenFactory(config).headers("alice")
        ) as reply,
    ):
        assert reply.status == status
        assert reply.headers.get("Allow") == allow
        assert reply.content_type == "application/json"
        assert "detail" in await reply.json()
        assert reply.headers["X-Request-ID"]


class IdTokenShop(ShopProvider):
    """A provider that may come to want the user's ID token while its credit is cached."""

    wants = False

    @property
    def id_token_required(self) -> bool:
        return self.wants


async def test_the_cached_path_asks_a_provider_that_may_want_an_id_token_every_time(
    make_client: ClientFactory, config: BillingConfig
) -> None:
    provider = IdTokenShop(credits=5)
    client = await make_client(config, provider=provider)
    headers = TokenFactory(config).headers("alice")
    for _ in range(2):  # loaded, then cached
        assert (await client.get(CREDITS, headers=headers)).status == 200
    provider.wants = True
    refused = await client.get(CREDITS, headers=headers)
    assert refused.status == 401  # before the cached credit could answer
    assert "detail" in await refused.json()
    assert (await client.get(CREDITS, headers={**headers, GOOGLE_HEADER: "id-token"})).status == 200
