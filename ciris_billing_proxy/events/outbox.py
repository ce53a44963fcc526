"""Where this service's events are kept: the provider's own database when it writes events, else the
service's (`database_url`, or a file of the data directory).

A provider that writes events (the grants ledger: `balance.low`, `credit.granted`, ...) names the
engine it writes them to in `CreditProvider.events_engine`; the events are written in its own
transactions, and the delivery reads them there, on the same engine, while the provider runs. For a
provider that writes none (`ciris`, `unlimited`), the service keeps the events it emits itself
(`purchase.succeeded` the first time a purchase's status is seen `succeeded`) on the `database_url`
database, or without one in `events.sqlite3` of the data directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..config import ConfigError
from ..database_budget import DatabaseBudget
from ..database_url import parse_database_url
from ..identity import Identity
from ..providers.base import CreditProvider
from ..store.choose import engine_for
from ..store.engine import Engine
from ..store.events import EventStore, event_store
from ..store.sqlite import SQLiteDatabase
from .delivery import EventDelivery

#: The outbox's file in the data directory when neither the provider nor `database_url` says where.
EVENTS_FILE: Final = "events.sqlite3"
#: Connections of the service's own outbox pool (PostgreSQL): a claim or a mark at a time.
POOL_SIZE: Final = 2


class EventOutbox:
    def __init__(
        self, delivery: EventDelivery, database_url: str | None, data_dir: Path, budget: DatabaseBudget
    ) -> None:
        self.delivery = delivery
        self._database_url = database_url
        self._data_dir = data_dir
        self._budget = budget
        self.store: EventStore | None = None
        #: Whether the service writes its own events here (the provider writes none).
        self.service_emits = False
        self._owned = False

    async def open(self, provider: CreditProvider) -> None:
        """After the provider started: the outbox on its engine, or on the service's own."""
        engine = provider.events_engine
        if engine is not None and not isinstance(engine, Engine):
            raise ConfigError(
                f"credit provider {provider.name!r} declared an events_engine that is no Engine "
                f"({type(engine).__name__})"
            )
        self.service_emits = engine is None
        if engine is None:
            engine = self._own_engine()
            self._owned = True
            store = event_store(engine)
            await store.open()
        else:
            store = event_store(engine)
            await store.prepare()
        self.store = store
        self.delivery.start(store)

    def _own_engine(self) -> Engine:
        timeout = self._budget.timeout_seconds
        if self._database_url is None:
            return SQLiteDatabase(self._data_dir / EVENTS_FILE, timeout=timeout)
        budget = DatabaseBudget(min(POOL_SIZE, self._budget.pool_size), timeout)
        return engine_for(parse_database_url(self._database_url), budget)

    async def close(self) -> None:
        await self.delivery.stop()
        store, self.store = self.store, None
        if store is not None and self._owned:
            await store.close()

    async def emit(
        self, kind: str, identity: Identity, data: Mapping[str, Any], once_key: str | None = None
    ) -> str | None:
        """Keep an event the service emits itself, and deliver it soon; its id, or None when one
        with `once_key` was kept before (by any process). `ProviderUnavailable` when the store does
        not answer."""
        if self.store is None:
            raise RuntimeError("the event outbox is not open")
        event_id = await self.store.add(kind, identity.namespace, identity.user_id, data, once_key)
        if event_id is not None:
            self.delivery.wake()
        return event_id
