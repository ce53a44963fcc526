"""The delivery loop: every process with a sink claims due events from the outbox, hands each to
every sink that has not taken it yet, and marks it delivered or schedules its next attempt.

* **Leases.** A claim moves the events' next attempt `LEASE_SECONDS` ahead (PostgreSQL: `FOR UPDATE
  SKIP LOCKED`; SQLite: `BEGIN IMMEDIATE`), so of any number of processes one delivers an event at a
  time; one that dies mid-delivery leaves it to the others once the lease is over, and one that stops
  gives its claims back at once.
* **Retries.** A failed attempt is retried after `retry_delay`: exponential from
  `FIRST_RETRY_SECONDS`, capped at `events_retry_max_seconds`, with jitter. Nothing is dropped: an
  event keeps being retried at the cap for as long as it fails, and the metrics show it (pending,
  the oldest one's age, the most attempts).
* **At least once.** An event is marked delivered only after every sink took it; a process stopped in
  between (or a store that could not be told) delivers it again later, so receivers de-duplicate by
  the event id. A sink that took it is not sent it again when another sink failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from ..errors import ProviderUnavailable
from ..ops.logs import FaultLog
from ..store.events import EventStore, OutboxStats, StoredEvent
from .model import Event
from .sinks import DeliveryFailed, Sink

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

#: How often the outbox is looked at when nothing woke the loop (a change made in this process
#: wakes it at once; one made by another process waits for this).
POLL_SECONDS: Final = 1.0
#: Wait before the first retry; each further one doubles it, up to the configured cap.
FIRST_RETRY_SECONDS: Final = 1.0
#: Shortest time between two looks at the outbox: a burst of changes in this process wakes the loop
#: once per this, not once per change.
MIN_ROUND_SECONDS: Final = 0.05
#: How long a claim holds events: past every sink's timeout, so a live process keeps its events.
LEASE_SECONDS: Final = 120.0
#: Events claimed at a time, and delivered at once.
CLAIM_BATCH: Final = 50
CONCURRENCY: Final = 8
#: How often the outbox's numbers (pending, oldest, attempts) are read for the metrics.
STATS_SECONDS: Final = 5.0
#: Delivered events are kept this long (for an operator's look), then forgotten.
DELIVERED_KEPT_SECONDS: Final = 7 * 24 * 3600.0
PRUNE_SECONDS: Final = 3600.0
#: Longest a stop waits for the store to take this process's claims back.
RELEASE_SECONDS: Final = 2.0


def retry_delay(
    attempts: int, cap: float, first: float = FIRST_RETRY_SECONDS, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before the next attempt after `attempts` failed ones: `first * 2**(attempts-1)` up to
    `cap`, of which the upper half is random (processes retrying one receiver spread out)."""
    ceiling = min(cap, first * 2.0 ** min(attempts - 1, 60))
    return ceiling / 2 + rand() * ceiling / 2


@dataclass(slots=True)
class DeliveryCounts:
    """What the metrics count of the delivery (`ops.metrics`)."""

    #: sink -> events it took.
    delivered: dict[str, int] = field(default_factory=dict)
    #: (sink, reason) -> failed attempts.
    failed: dict[tuple[str, str], int] = field(default_factory=dict)
    #: The outbox as last read (every `STATS_SECONDS`).
    outbox: OutboxStats = field(default_factory=lambda: OutboxStats(0, 0.0, 0))


class EventDelivery:
    def __init__(self, sinks: Sequence[Sink], *, retry_max_seconds: float) -> None:
        self.sinks = tuple(sinks)
        self.retry_max_seconds = retry_max_seconds
        #: Settable before start (tests use shorter ones).
        self.first_retry = min(FIRST_RETRY_SECONDS, retry_max_seconds)
        self.poll = POLL_SECONDS
        #: This process's claims carry it.
        self.token = secrets.token_hex(16)
        self.counts = DeliveryCounts()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._store: EventStore | None = None
        #: When the soonest retry this process scheduled in the current round is due (monotonic).
        self._soonest = math.inf

    def start(self, store: EventStore) -> None:
        if self._task is None:
            self._store = store
            self._task = asyncio.create_task(self._run(store))

    def wake(self) -> None:
        """Look at the outbox now (an event was just written by this process). Without sinks there
        is nothing to deliver, and a round would only keep the outbox's stats and pruning, which run
        on their own clock: every spend calls this, and a round woken for nothing cost a gated
        interaction about 17,000 instructions (`bench.instructions`)."""
        if self.sinks:
            self._wake.set()

    async def stop(self) -> None:
        """Stop delivering (an attempt under way is cut short: its event stays in the outbox) and
        give this process's claims back, so the next process delivers them at once."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for sink in self.sinks:
            await sink.close()
        if self.sinks and self._store is not None:
            try:
                await asyncio.wait_for(self._store.release(self.token), RELEASE_SECONDS)
            except (ProviderUnavailable, TimeoutError):
                logger.info(
                    "Could not give back this process's event claims; they expire in %.0f s", LEASE_SECONDS
                )

    async def _run(self, store: EventStore) -> None:
        for sink in self.sinks:
            await sink.open()
        limit = asyncio.Semaphore(CONCURRENCY)
        # Not at once: a process starting does not add reads to its first requests' database.
        stats_due = prune_due = time.monotonic() + STATS_SECONDS
        while True:
            started = time.monotonic()
            self._wake.clear()
            self._soonest = math.inf
            full = False
            try:
                if self.sinks:
                    batch = await store.claim(self.token, LEASE_SECONDS, CLAIM_BATCH)
                    full = len(batch) == CLAIM_BATCH
                    outcomes = await asyncio.gather(
                        *(self._deliver(store, stored, limit) for stored in batch), return_exceptions=True
                    )
                    for outcome in outcomes:
                        if isinstance(outcome, Exception):
                            # Its claim runs out and it is tried again; the others went on.
                            faults.error("Could not deliver a billing event: %s", type(outcome).__name__)
                now = time.monotonic()
                if now >= stats_due:
                    self.counts.outbox = await store.stats()
                    stats_due = now + STATS_SECONDS
                if now >= prune_due:
                    await store.prune(time.time() - DELIVERED_KEPT_SECONDS)
                    prune_due = now + PRUNE_SECONDS
            except ProviderUnavailable:
                pass  # the store is away (logged by the engine); the next round tries again
            except Exception as exc:
                faults.error("Could not look for billing events to deliver: %s", type(exc).__name__)
            if full:
                continue
            # A retry due before the next poll is not left waiting for it.
            wait = max(0.0, min(self.poll, self._soonest - time.monotonic()))
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            pause = started + MIN_ROUND_SECONDS - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)

    async def _deliver(self, store: EventStore, stored: StoredEvent, limit: asyncio.Semaphore) -> None:
        async with limit:
            event = Event.from_stored(stored)
            done = set(stored.sinks_done)
            errors = []
            for sink in self.sinks:
                if sink.name in done:
                    continue
                try:
                    await sink.send(event)
                except DeliveryFailed as exc:
                    key = (sink.name, exc.reason)
                    self.counts.failed[key] = self.counts.failed.get(key, 0) + 1
                    errors.append(f"{sink.name}: {exc}")
                    continue
                done.add(sink.name)
                self.counts.delivered[sink.name] = self.counts.delivered.get(sink.name, 0) + 1
            try:
                if not errors:
                    await store.delivered(event.id, frozenset(done))
                    return
                attempts = stored.attempts + 1
                delay = retry_delay(attempts, self.retry_max_seconds, self.first_retry)
                self._soonest = min(self._soonest, time.monotonic() + delay)
                faults.warning(
                    "Billing event delivery failed: %s; attempt %d, next in %.3g s",
                    "; ".join(errors),
                    attempts,
                    delay,
                )
                await store.failed(event.id, self.token, delay, frozenset(done), "; ".join(errors))
            except ProviderUnavailable:
                # The store did not hear of it: the lease runs out and the event is tried again
                # (delivered twice, which receivers de-duplicate by id).
                pass
