"""Faults a test can inject into the fake backend, per endpoint or for all, for N calls or until cleared."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal[
    "latency",  # wait `seconds` before answering normally
    "latency_after",  # do the work, then wait `seconds` before answering (a commit, then a timeout)
    "error_500",  # 500 text/plain "Internal Server Error", as an uncaught exception gives
    "error_502",  # 502 from the load balancer, HTML
    "rate_limit_503",  # nginx limit_req rejection: 503 with an HTML body
    "rate_limit_429",  # the 429 the docs promise
    "drop",  # close the connection without a reply
    "bad_json",  # 200 with a body that is not JSON
    "reject_key",  # 401 as for a revoked key
    "not_found",  # 404 "Payment not found: ..." as a Stripe outage gives on status
    "bad_request",  # 400 with a plain detail, as a rejected purchase gives
    "stripe_unavailable",  # 503 "Payment provider unavailable", as any Stripe error on a purchase gives
    "cloudflare_403",  # 403 text/plain "Direct access forbidden...", from the production origin
]

DELAYS = frozenset({"latency", "latency_after"})

ALL_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]


@dataclass
class Fault:
    kind: str
    endpoint: str | None = None
    times: int | None = None
    seconds: float = 0.0


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        if fault.kind not in ALL_KINDS:
            raise ValueError(f"unknown fault {fault.kind!r}; choose from {', '.join(ALL_KINDS)}")
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, endpoint: str) -> list[Fault]:
        """The faults for this call, oldest first: at most one delay and one reply, each used up by
        this call (further faults of the same sort wait for the next calls)."""
        taken: list[Fault] = []
        with self._lock:
            for fault in list(self._faults):
                if fault.endpoint not in (None, endpoint):
                    continue
                if any((t.kind in DELAYS) == (fault.kind in DELAYS) for t in taken):
                    continue
                taken.append(fault)
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
        return taken
