"""The billing event as the host's callback receives it and a webhook's body carries it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..store.events import StoredEvent


@dataclass(frozen=True, slots=True)
class Event:
    """One billing event (docs/events.md lists the kinds and their `data`). `id` is unique across
    processes and restarts: delivery is at least once, so a receiver de-duplicates by it."""

    id: str
    kind: str
    created_at: datetime
    user_id: str
    namespace: str
    data: Mapping[str, Any]

    @classmethod
    def from_stored(cls, stored: StoredEvent) -> Event:
        return cls(
            stored.event_id,
            stored.kind,
            datetime.fromisoformat(stored.created_at),
            stored.user_id,
            stored.namespace,
            json.loads(stored.data),
        )

    def to_json(self) -> dict[str, Any]:
        """The webhook's body: `{id, type, created, user_id, namespace, data}`, `created` in Unix
        seconds (Stripe's shape, so receivers written for it read this too)."""
        return {
            "id": self.id,
            "type": self.kind,
            "created": int(self.created_at.timestamp()),
            "user_id": self.user_id,
            "namespace": self.namespace,
            "data": dict(self.data),
        }

    def body(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()


#: What a host registers (`setup_billing(..., on_event=...)`): called once per event in the normal
#: case, again after it raised (retried like a webhook); the id tells repeats apart.
EventHandler = Callable[[Event], Awaitable[None]]
