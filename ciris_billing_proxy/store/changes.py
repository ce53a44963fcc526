"""The change feed: how every process sharing one database learns what changed elsewhere.

A process publishes "this user's credit changed", "everyone's changed", "this token is revoked" and
"this user's tokens issued before this moment are void" (a token epoch); every other process on the
database hears it and drops its cached entry, or refuses the tokens.
PostgreSQL carries it with `LISTEN/NOTIFY` (`feed_postgres`), a SQLite file with a polled table
(`feed_sqlite`). Revocations are also kept in a `revoked_tokens` table (a digest of the token, never
the token, until its expiry), and epochs in a `token_epochs` table (one row per user whose sessions
were ended), which a process loads when it starts and after its feed reconnects. The same database
keeps the password hash each local user last started with (`user_passwords`), so a restart with a
new password can end the sessions of the old one (`tools.users`).

Credit changes are published in the background, batched: a burst of spends costs one database
round trip, not one each, and never delays the reply. A revocation is written before the logout is
answered, so a logout that was answered 200 holds in every process.

While a feed is down (its connection lost) it tells its listener, which must not trust its cache
for long (`FEED_DOWN_MAX_AGE_SECONDS`); once it is back it reloads the revocations and tells the
listener to start afresh, since what was published meanwhile was not heard.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import ClassVar, Final, Protocol

from ..errors import ProviderUnavailable
from ..ops.logs import FaultLog

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

#: Longest a cached entry may be served while the feed is down.
FEED_DOWN_MAX_AGE_SECONDS: Final = 5.0
#: Pending identities beyond this are published as "everyone changed": one message, same effect.
MAX_PENDING: Final = 10_000
#: Longest wait between attempts to publish, or to reconnect a lost feed.
MAX_BACKOFF_SECONDS: Final = 2.0
#: PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more; batches are split below it.
MAX_PAYLOAD: Final = 7_000
#: How long changes gather before they are published: under load one round trip carries many, for
#: a delay far below the 1 s freshness bound.
GATHER_SECONDS: Final = 0.01

IdentityKey = tuple[str, str]


class ChangeListener(Protocol):
    """What a process does with what it hears (the billing service implements it)."""

    def identity_changed(self, key: IdentityKey) -> None: ...

    def all_changed(self) -> None: ...

    def token_revoked(self, digest: bytes, until: float) -> None: ...

    def epoch_moved(self, key: IdentityKey, epoch: float) -> None:
        """Tokens of this user issued (`iat`) before `epoch` are void."""

    def feed_down(self) -> None:
        """The feed lost its connection: changes made elsewhere may go unheard until `feed_up`."""

    def feed_up(self) -> None:
        """The feed is back (revocations reloaded); anything cached meanwhile may be stale."""


def encode(sender: str, identities: Iterable[IdentityKey], everyone: bool) -> list[str]:
    """Payloads, each below `MAX_PAYLOAD`, carrying the changed identities (or "everyone"). Each
    starts with its sender's id, so a process skips its own without decoding them."""
    if everyone:
        return [sender + json.dumps({"a": True})]
    payloads: list[str] = []
    batch: list[list[str]] = []
    size = 0
    for namespace, user_id in identities:
        item = [namespace, user_id]
        item_size = len(json.dumps(item)) + 1
        if batch and size + item_size > MAX_PAYLOAD - 64:
            payloads.append(sender + json.dumps({"i": batch}))
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        payloads.append(sender + json.dumps({"i": batch}))
    return payloads


def encode_revocation(sender: str, digest: bytes, until: float) -> str:
    return sender + json.dumps({"r": [digest.hex(), until]})


def encode_epoch(sender: str, key: IdentityKey, epoch: float) -> str:
    return sender + json.dumps({"e": [key[0], key[1], epoch]})


def deliver(payload: str, me: str, listener: ChangeListener) -> None:
    """Hand one payload to the listener; its own, and anything malformed, are ignored."""
    if payload.startswith(me):
        return
    try:
        message = json.loads(payload[len(me) :])
        if message.get("a"):
            listener.all_changed()
        for namespace, user_id in message.get("i", ()):
            listener.identity_changed((str(namespace), str(user_id)))
        if "r" in message:
            digest, until = message["r"]
            listener.token_revoked(bytes.fromhex(digest), float(until))
        if "e" in message:
            namespace, user_id, epoch = message["e"]
            listener.epoch_moved((str(namespace), str(user_id)), float(epoch))
    except (ValueError, TypeError, AttributeError):
        logger.warning("Ignored a malformed change notification")


class ChangeFeed(abc.ABC):
    """Publish changes made here; hear the ones made elsewhere (see the module docstring)."""

    #: Whether `_publish_now` can send on the loop (a SQLite file can; PostgreSQL's pool cannot).
    publishes_on_loop: ClassVar[bool] = False

    def __init__(self) -> None:
        self.sender = secrets.token_hex(8)
        self._pending: set[IdentityKey] = set()
        self._everyone = False
        self._wake = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        #: The end of the gathering of pending changes (`_gathered`), while one is scheduled.
        self._gathering: asyncio.TimerHandle | None = None
        self._listener: ChangeListener | None = None
        #: `time.monotonic()` at which the feed last confirmed it hears the other processes (0: never); how
        #: long ago that was is the most a change made elsewhere can have gone unheard.
        self.heard_at = 0.0

    async def start(self, listener: ChangeListener) -> None:
        """Open, bring the schema up to date, load unexpired revocations and the epochs into
        `listener`, and start hearing changes. `DatabaseUnavailable` when the database cannot be
        used."""
        self._listener = listener
        await self._open(listener)
        self._publisher = asyncio.create_task(self._publish_forever())

    async def stop(self) -> None:
        """Publish what is pending (once, if it can), then stop."""
        publisher, self._publisher = self._publisher, None
        gathering, self._gathering = self._gathering, None
        if gathering is not None:
            gathering.cancel()
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            try:
                await self._flush()
            except ProviderUnavailable:
                logger.warning("Could not publish the last credit changes at shutdown")
        await self._close()

    def changed(self, key: IdentityKey) -> None:
        """This user's credit changed here: tell the other processes (in the background)."""
        if len(self._pending) >= MAX_PENDING:
            self._everyone = True
            self._pending.clear()
        elif not self._everyone:
            self._pending.add(key)
        self._gather()

    def changed_all(self) -> None:
        self._everyone = True
        self._pending.clear()
        self._gather()

    def _gather(self) -> None:
        """Publish what is pending `GATHER_SECONDS` from now (a timer, unless one is running or the
        publisher task is already awake: they take these too)."""
        if self._gathering is None and self._publisher is not None and not self._wake.is_set():
            self._gathering = asyncio.get_running_loop().call_later(GATHER_SECONDS, self._gathered)

    def _gathered(self) -> None:
        """The gathering is over: publish on the loop if the feed can do that without waiting
        (`_publish_now`; a timer callback, no task woken), else wake the publisher task."""
        self._gathering = None
        pending, everyone = self._pending, self._everyone
        if not pending and not everyone:
            return
        try:
            sent = self.publishes_on_loop and self._publish_now(encode(self.sender, pending, everyone))
        except Exception:  # nothing sent: the publisher task sends it, and logs what keeps failing
            sent = False
        if sent:
            self._pending, self._everyone = set(), False
        else:
            self._wake.set()

    @abc.abstractmethod
    async def ping(self) -> None:
        """One round trip to the database; `ProviderUnavailable` when it does not answer."""

    def connections_in_use(self) -> int:
        """Connections of the feed's pool lent out now (for the metrics)."""
        return 0

    @abc.abstractmethod
    async def revoke(self, digest: bytes, until: float) -> None:
        """Record a revoked token (its digest, kept until `until`) and tell every process;
        `ProviderUnavailable` when the database cannot be reached."""

    @abc.abstractmethod
    async def move_epoch(self, key: IdentityKey, epoch: float) -> None:
        """Void the user's tokens issued before `epoch` (an epoch never moves back) and tell every
        process; `ProviderUnavailable` when the database cannot be reached."""

    @abc.abstractmethod
    async def recorded_passwords(self) -> dict[str, str]:
        """Local username -> the password hash it last started with (`record_passwords`)."""

    @abc.abstractmethod
    async def record_passwords(self, hashes: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    async def open_store(self) -> None:
        """Open the database and bring the schema up to date, without hearing changes (for tools
        that only write: `move_epoch`, the passwords); `close_store` closes it."""

    @abc.abstractmethod
    async def close_store(self) -> None: ...

    @abc.abstractmethod
    async def _open(self, listener: ChangeListener) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    @abc.abstractmethod
    async def _publish(self, payloads: list[str]) -> None:
        """Send the payloads; `ProviderUnavailable` when the database cannot be reached."""

    def _publish_now(self, payloads: list[str]) -> bool:
        """Send the payloads on the loop, if this feed can without waiting for anything: True when
        they were sent, False (nothing sent) when the publisher task must (`_publish`)."""
        return False

    async def _publish_forever(self) -> None:
        """Publishes what `_gathered` could not send on the loop (and, while the database refuses,
        retries with a growing delay)."""
        delay = 0.05
        while True:
            await self._wake.wait()
            try:
                await self._flush()
            except ProviderUnavailable:
                # Kept and sent with whatever comes next: the other processes' feeds are most
                # likely down too, and then their caches keep entries only briefly anyway.
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            except Exception as exc:
                faults.error("Publishing credit changes failed: %s", type(exc).__name__)
                await asyncio.sleep(MAX_BACKOFF_SECONDS)
                continue
            delay = 0.05

    async def _flush(self) -> None:
        self._wake.clear()
        pending, everyone = self._pending, self._everyone
        if not pending and not everyone:
            return
        self._pending, self._everyone = set(), False
        try:
            await self._publish(encode(self.sender, pending, everyone))
        except BaseException:
            if everyone:
                self.changed_all()
            else:
                for key in pending:
                    self.changed(key)
            raise
