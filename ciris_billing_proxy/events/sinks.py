"""Where events go: the host's callback and the webhook (`webhooks.WebhookSink`) are sinks, each
taking one event at a time and raising `DeliveryFailed` when it did not take it."""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from .model import Event, EventHandler

#: Longest the host's callback may take for one event; past that the attempt failed.
CALLBACK_TIMEOUT_SECONDS: Final = 30.0


class DeliveryFailed(Exception):
    """One attempt failed; `reason` is the metric's label (status, timeout, connection,
    callback_error), the message says what happened without a URL or secret."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, event: Event) -> None: ...


class CallbackSink:
    """The host's `on_event`: an exception it raises (or running past the timeout) is a failed
    attempt, retried like a webhook's."""

    name = "callback"

    def __init__(self, handler: EventHandler, timeout: float = CALLBACK_TIMEOUT_SECONDS) -> None:
        self.handler = handler
        self.timeout = timeout

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, event: Event) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.handler(event)
        except TimeoutError:
            raise DeliveryFailed(f"the callback took more than {self.timeout:g} s", "timeout") from None
        except Exception as exc:
            raise DeliveryFailed(f"the callback raised {type(exc).__name__}", "callback_error") from None
