"""Prometheus metrics, counted for (nearly) nothing on the request path.

The request path only bumps plain ints and dict entries (`Counts`, `Latencies`, the credit cache's
`hits`/`misses`): no lock, no file write, no object per request. prometheus-client sees them only
when it is asked:

* one process: `BillingCollector` builds the metric families from those numbers at scrape time;
* several processes (`serve --workers N`, gunicorn; prometheus-client's multiprocess mode, chosen by
  `PROMETHEUS_MULTIPROC_DIR`): each process writes its totals into its own files in that directory
  every `FLUSH_SECONDS`, at shutdown, and before answering a scrape itself; a scrape of any process
  merges every process's files (counters summed, including those of processes that have exited;
  each gauge as its mode says).

Names follow Prometheus conventions under `ciris_billing_`; labels take few values (route templates,
never user ids or raw paths). docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.values import MultiProcessValue

from ..keys import billing_service
from ..store.postgres import PostgresDatabase

if TYPE_CHECKING:
    from ..service import BillingService

logger = logging.getLogger("ciris_billing_proxy")

#: The variable that turns prometheus-client's multiprocess mode on: the directory of its files.
MULTIPROC_DIR_VAR: Final = "PROMETHEUS_MULTIPROC_DIR"
#: How often a process of a multiprocess group writes its numbers to its files.
FLUSH_SECONDS: Final = 1.0
METRICS_PATH: Final = "/metrics"
#: Provider call durations, in seconds: from a cached-database round trip to a backend timeout.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Requests of routes that matched none (aiohttp's 404/405 outside the billing sub-app's own).
UNMATCHED: Final = "unmatched"

#: A request's route, as aiohttp matched it (or `UNMATCHED`), and its status.
RequestKey = tuple[object, int]


class Latencies:
    """Provider call durations by (method, outcome): per series, the count of each bucket (the last
    is +Inf) followed by the sum. An observation is a bisect and two additions."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        counts = self.series.get((method, outcome))
        if counts is None:
            counts = self.series[(method, outcome)] = [0.0] * (len(BUCKETS) + 2)
        counts[bisect_left(BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def count(self, method: str, outcome: str) -> int:
        counts = self.series.get((method, outcome))
        return 0 if counts is None else int(sum(counts[:-1]))


@dataclass(slots=True)
class Counts:
    """Everything the service counts, as plain numbers (see the module docstring)."""

    #: (route, status) -> requests; filled by the billing error middleware and the credit gate.
    requests: dict[RequestKey, int] = field(default_factory=dict)
    latencies: Latencies = field(default_factory=Latencies)
    #: (store, outcome) -> app store verifications.
    verifications: dict[tuple[str, str], int] = field(default_factory=dict)
    #: outcome -> Stripe webhooks (the `stripe` provider's route): ok, duplicate, ignored, refused, failed.
    webhooks: dict[str, int] = field(default_factory=dict)
    #: Give-backs still owed at shutdown, no longer retried by this process.
    give_backs_abandoned: int = 0
    login_failures: int = 0
    login_lockouts: int = 0

    def request(self, route: object, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class Family:
    """One metric, built at scrape time. Histogram buckets are per bucket, not cumulative (as the
    multiprocess files keep them); `to_metric` accumulates them for exposition."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]]
    #: How the multiprocess merge combines this gauge over processes.
    mode: str = "livesum"

    def to_metric(self) -> Metric:
        metric = Metric(self.name, self.help, self.kind)
        if self.kind != "histogram":
            for suffix, labels, value in self.samples:
                metric.add_sample(self.name + suffix, labels, value)
            return metric
        running: dict[tuple[tuple[str, str], ...], float] = {}
        for suffix, labels, value in self.samples:
            if suffix == "_bucket":
                series = tuple((k, v) for k, v in labels.items() if k != "le")
                running[series] = running.get(series, 0.0) + value
                metric.add_sample(self.name + suffix, labels, running[series])
            else:
                metric.add_sample(self.name + suffix, labels, value)
        for series, total in running.items():
            metric.add_sample(self.name + "_count", dict(series), total)
        return metric


def families(service: BillingService) -> list[Family]:
    """Every metric of `service`, from its plain numbers."""
    counts = service.counts
    latencies = counts.latencies
    requests: dict[tuple[str, str, str], float] = {}
    for (route, status), n in list(counts.requests.items()):
        key = (*_route_labels(route), str(status))
        requests[key] = requests.get(key, 0) + n
    duration: list[tuple[str, dict[str, str], float]] = []
    for (method, outcome), values in list(latencies.series.items()):
        labels = {"method": method, "outcome": outcome}
        for bound, observed in zip((*BUCKETS, float("inf")), values, strict=False):
            duration.append(("_bucket", {**labels, "le": _le(bound)}, observed))
        duration.append(("_sum", labels, values[-1]))
    feed = service.feed
    # Not the loop's clock: a host's registry may be scraped from another thread.
    now = time.monotonic()
    return [
        Family(
            "ciris_billing_requests",
            "counter",
            "Billing, auth and gated requests answered, by method, route template and status.",
            [
                ("_total", {"method": m, "route": r, "status": s}, n)
                for (m, r, s), n in sorted(requests.items())
            ],
        ),
        Family(
            "ciris_billing_credit_cache_hits",
            "counter",
            "Credit lookups answered from the cache.",
            [("_total", {}, service.cache.hits)],
        ),
        Family(
            "ciris_billing_credit_cache_misses",
            "counter",
            "Credit lookups that asked the provider.",
            [("_total", {}, service.cache.misses)],
        ),
        Family(
            "ciris_billing_provider_call_duration_seconds",
            "histogram",
            "Calls to the credit provider, by method and outcome (ok, insufficient_credit, refused, "
            "unavailable, error).",
            duration,
        ),
        _outcomes(
            "ciris_billing_spends",
            "Uses taken (spend), by outcome.",
            latencies,
            "spend",
        ),
        _outcomes(
            "ciris_billing_give_backs",
            "Give-back attempts (a use returned after a failed interaction; a paid use is refunded), "
            "by outcome; unavailable ones are retried, abandoned ones were still owed at shutdown.",
            latencies,
            "give_back",
            {"abandoned": counts.give_backs_abandoned},
        ),
        _outcomes(
            "ciris_billing_purchases",
            "Purchases started (initiate), by outcome.",
            latencies,
            "initiate_purchase",
        ),
        Family(
            "ciris_billing_store_verifications",
            "counter",
            "App store purchase verifications, by store and outcome (credited, already_processed, "
            "refused, unavailable, error).",
            [
                ("_total", {"store": store, "outcome": outcome}, n)
                for (store, outcome), n in sorted(counts.verifications.items())
            ],
        ),
        Family(
            "ciris_billing_stripe_webhooks",
            "counter",
            "Stripe webhooks received (the stripe provider), by outcome (ok, duplicate, ignored, "
            "refused: a missing, forged or stale signature, failed: answered 503).",
            [("_total", {"outcome": outcome}, n) for outcome, n in sorted(counts.webhooks.items())],
        ),
        Family(
            "ciris_billing_login_failures",
            "counter",
            "Logins refused for a wrong username or password.",
            [("_total", {}, counts.login_failures)],
        ),
        Family(
            "ciris_billing_login_lockouts",
            "counter",
            "Logins refused with 429 after too many failures.",
            [("_total", {}, counts.login_lockouts)],
        ),
        Family(
            "ciris_billing_give_backs_owed",
            "gauge",
            "Give-backs owed and not yet made (retried in the background).",
            [("", {}, service.give_backs_owed())],
        ),
        Family(
            "ciris_billing_change_feed_up",
            "gauge",
            "1 while the change feed hears the other processes, else 0 (over processes: the lowest).",
            [("", {}, 1.0 if feed is None or service.feed_listening else 0.0)],
            mode="livemin",
        ),
        Family(
            "ciris_billing_change_feed_lag_seconds",
            "gauge",
            "Seconds since the change feed last confirmed it hears the other processes: the longest a "
            "change made elsewhere may have gone unheard (over processes: the highest).",
            [("", {}, 0.0 if feed is None or not feed.heard_at else max(0.0, now - feed.heard_at))],
            mode="livemax",
        ),
        *_event_families(service),
        Family(
            "ciris_billing_database_connections_in_use",
            "gauge",
            "Connections lent out by the process's PostgreSQL pools (records, change feed, give-back "
            "outbox, login throttle, audit; over processes: the sum).",
            [("", {}, PostgresDatabase.connections_in_use_by_process())],
        ),
    ]


def _event_families(service: BillingService) -> list[Family]:
    """The event delivery's counters, and the outbox as the delivery last read it (every process
    sharing a store reads the same outbox: over processes, the highest)."""
    if service.events is None:
        return []
    counts = service.events.delivery.counts
    outbox = counts.outbox
    return [
        Family(
            "ciris_billing_events_delivered",
            "counter",
            "Billing events a sink (callback, webhook) took.",
            [("_total", {"sink": sink}, n) for sink, n in sorted(counts.delivered.items())],
        ),
        Family(
            "ciris_billing_events_failed",
            "counter",
            "Failed attempts to deliver a billing event, by sink and reason (status, timeout, "
            "connection, callback_error); each is retried.",
            [
                ("_total", {"sink": sink, "reason": reason}, n)
                for (sink, reason), n in sorted(counts.failed.items())
            ],
        ),
        Family(
            "ciris_billing_events_pending",
            "gauge",
            "Billing events kept and not delivered yet.",
            [("", {}, outbox.pending)],
            mode="livemax",
        ),
        Family(
            "ciris_billing_events_oldest_pending_seconds",
            "gauge",
            "Age of the oldest billing event not delivered yet (0 when none): alert when it grows.",
            [("", {}, outbox.oldest_seconds)],
            mode="livemax",
        ),
        Family(
            "ciris_billing_events_most_attempts",
            "gauge",
            "Most failed attempts of any billing event not delivered yet.",
            [("", {}, outbox.most_attempts)],
            mode="livemax",
        ),
    ]


def _route_labels(route: object) -> tuple[str, str]:
    if isinstance(route, web.AbstractRoute):
        resource = route.resource
        return route.method, resource.canonical if resource is not None else UNMATCHED
    return "", UNMATCHED


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _outcomes(
    name: str, help_text: str, latencies: Latencies, method: str, extra: dict[str, int] | None = None
) -> Family:
    """A counter by outcome, read from the provider call durations of `method` (no second count)."""
    totals = {
        outcome: latencies.count(method, outcome)
        for (called, outcome) in list(latencies.series)
        if called == method
    }
    totals.update({outcome: n for outcome, n in (extra or {}).items() if n})
    return Family(
        name,
        "counter",
        help_text,
        [("_total", {"outcome": outcome}, n) for outcome, n in sorted(totals.items())],
    )


class BillingCollector(Collector):
    """A prometheus-client collector of one service's metrics, for a host's own registry:
    `prometheus_client.REGISTRY.register(BillingCollector(billing))` (one process only; under
    several, see `metrics_text`)."""

    def __init__(self, service: BillingService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        for family in families(self.service):
            yield family.to_metric()


class MultiprocessWriter:
    """Writes one process's totals into its files in the multiprocess directory (absolute values:
    a write is idempotent, so writing often loses nothing)."""

    def __init__(self) -> None:
        # A value class of its own: its files are this process's, whatever else loaded
        # prometheus-client before the directory was set.
        self._value_class = MultiProcessValue()  # type: ignore[no-untyped-call]
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}

    def write(self, written: Iterable[Family]) -> None:
        for family in written:
            for suffix, labels, value in family.samples:
                key = (family.name + suffix, tuple(labels.items()))
                target = self._values.get(key)
                if target is None:
                    target = self._values[key] = self._value_class(
                        family.kind,
                        family.name,
                        family.name + suffix,
                        tuple(labels),
                        tuple(labels.values()),
                        family.help,
                        multiprocess_mode=family.mode,
                    )
                target.set(float(value))


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when this process is one of a group sharing one."""
    return os.environ.get(MULTIPROC_DIR_VAR) or None


def metrics_publisher(service: BillingService) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` entry: while the service runs in a multiprocess group, write its numbers
    every `FLUSH_SECONDS` and once more at the end; alone, nothing (a scrape reads them directly)."""

    async def publish(_app: web.Application) -> AsyncIterator[None]:
        if multiprocess_dir() is None:
            yield
            return
        writer = service.metrics_writer = MultiprocessWriter()

        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                writer.write(families(service))

        task = asyncio.create_task(flush_forever())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            writer.write(families(service))

    return publish


def metrics_text(service: BillingService) -> bytes:
    """The Prometheus text exposition of `service`'s metrics; in a multiprocess group, of every
    process's (this one's written first, so a scrape shows its own latest numbers)."""
    path = multiprocess_dir()
    registry = CollectorRegistry()
    if path is None:
        registry.register(BillingCollector(service))
    else:
        if service.metrics_writer is not None:
            service.metrics_writer.write(families(service))
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def metrics(request: web.Request) -> web.Response:
    body = metrics_text(billing_service(request))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics_route(app: web.Application, path: str = METRICS_PATH) -> None:
    """Add `GET /metrics` (Prometheus text format, no token needed) to `app`. `setup_billing()`
    must have been called on `app` or on an application it is mounted in."""
    app.router.add_get(path, metrics)
