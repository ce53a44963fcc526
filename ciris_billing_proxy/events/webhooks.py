"""Signed webhooks: each event POSTed as JSON to `events_url`, signed with `events_secret`.

The signature is Stripe's scheme: `X-CIRIS-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>">`, so a receiver checks that the body is the one signed, with the secret it shares, and
recent (a replayed old request fails the tolerance). `verify_signature` is that check, for receivers.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

import aiohttp

from ..version import __version__
from .model import Event
from .sinks import DeliveryFailed

SIGNATURE_HEADER: Final = "X-CIRIS-Signature"
EVENT_ID_HEADER: Final = "X-CIRIS-Event-Id"
#: Default of `verify_signature`: how old a signature may be (and how far in the future, for
#: clocks that disagree), in seconds.
TOLERANCE_SECONDS: Final = 300
#: Longest one delivery may take (connecting, sending, the receiver's answer).
WEBHOOK_TIMEOUT_SECONDS: Final = 10.0


class SignatureVerificationError(ValueError):
    """The signature header is missing, malformed, stale, or signs another body or secret."""


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str | bytes, timestamp: int | None = None) -> str:
    """The `X-CIRIS-Signature` value for `body`, signed now (or at `timestamp`)."""
    at = int(time.time()) if timestamp is None else timestamp
    return f"t={at},v1={_digest(secret, at, body)}"


def verify_signature(
    body: bytes | bytearray | memoryview | str,
    header: str | None,
    secret: str | bytes,
    tolerance: float = TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> int:
    """Check a webhook's `X-CIRIS-Signature` header against the raw request body (the bytes as
    received, before any JSON parsing; or that text, encoded as UTF-8 here: the body is ASCII
    JSON, so text read from it gives the same bytes back); the signed Unix time.
    `SignatureVerificationError` when it does not hold; `TypeError` for a body of another type
    (such as the parsed JSON), which no signature can be checked against. Compares in constant
    time; any of several `v1=` values may match (a sender rolling its secret signs with both)."""
    if isinstance(body, str):
        raw = body.encode()
    elif isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
    else:
        raise TypeError(
            f"verify_signature needs the raw request body as bytes or str, not {type(body).__name__}: "
            "check it before parsing the JSON"
        )
    if not header:
        raise SignatureVerificationError("no signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureVerificationError("malformed signature timestamp") from None
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureVerificationError("malformed signature header")
    expected = _digest(secret, timestamp, raw)
    # Every candidate compared, whatever the first gave: no timing difference between them.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise SignatureVerificationError("signature does not match")
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise SignatureVerificationError("signature timestamp outside the tolerance")
    return timestamp


class WebhookSink:
    """POSTs each event to the URL; a 2xx is delivered, anything else (a redirect too), a timeout or
    a connection error is a failed attempt. The URL is never logged or stored with an error (it may
    carry a token in its query)."""

    name = "webhook"

    def __init__(self, url: str, secret: str, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> None:
        self.url = url
        self._secret = secret.encode()
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": f"ciris-billing-proxy/{__version__}"},
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, event: Event) -> None:
        if self._session is None:
            raise DeliveryFailed("not started", "connection")
        body = event.body()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._secret),
            EVENT_ID_HEADER: event.id,
        }
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as reply:
                # The body is not read: only the status counts, and a receiver's answer may be large.
                status = reply.status
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self.timeout:g} s", "timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryFailed(f"cannot reach the receiver ({type(exc).__name__})", "connection") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}", "status")
