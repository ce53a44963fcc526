"""The give-back outbox: every give-back owed is kept durably until some process has made it.

A give-back the provider cannot make now (its backend or database is down) is recorded here before
anything else happens: in the store when it answers (a row claimed by this process), else in the
spool file of the data directory. This process then retries it (`GiveBackRetries`: backoff, jitter,
a few at a time) and forgets it once made. Every process sharing the store also looks, every
`period` seconds, for rows nobody holds a live claim on (their process stopped, was killed, or
released them at shutdown) and makes them too; and once the store answers again, the spool's lines
are moved into it. So a give-back survives a SIGTERM, a restart and an outage that outlives the
process; `ciris-billing-proxy reconcile` makes whatever is owed without serving.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..database_budget import DatabaseBudget
from ..database_url import parse_database_url
from ..errors import ProviderUnavailable
from ..store.choose import engine_for
from ..store.engine import Engine
from ..store.give_backs import GiveBackStore, Owed, give_back_store
from ..store.sqlite import SQLiteDatabase
from .logs import FaultLog
from .spool import SPOOL_FILE, Slot, Spool, Taken

logger = logging.getLogger("ciris_billing_proxy")
#: Fault lines an outage repeats: once, then a count (`ops.logs.FaultLog`).
faults = FaultLog(logger)

#: Rows claimed at a time; more wait for the next round (the retries make a few at once anyway).
CLAIM_BATCH: Final = 100
#: Longest a stop waits for the store to release this process's claims: a stalled database must not
#: hold the shutdown (the claims then expire by themselves).
RELEASE_SECONDS: Final = 2.0


def lease_seconds(period: float) -> float:
    """How long a claim outlives its last renewal: several rounds, so a busy loop never loses one."""
    return max(30.0, 4 * period)


class GiveBackOutbox:
    def __init__(self, store: GiveBackStore, spool_path: Path, *, period: float) -> None:
        self.store = store
        self.spool = Spool(spool_path)
        self.period = period
        self.lease = lease_seconds(period)
        #: This process's claims in the store, and its lines in the spool, carry this.
        self.token = secrets.token_hex(16)
        self._task: asyncio.Task[None] | None = None
        #: Made, but neither the store nor the spool could say so yet: forgotten in a later round.
        self._unrecorded: set[Slot] = set()

    async def open(self) -> None:
        """Open the store (`DatabaseUnavailable` when it cannot be reached at startup)."""
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    def start(self, make: Callable[[Owed], None]) -> None:
        """Look for give-backs nobody is making every `period` seconds, from now on, and hand each
        one claimed to `make`."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(make))

    async def stop(self) -> None:
        """Stop looking, and give up this process's claims so the next process takes them at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.store.release(self.token), RELEASE_SECONDS)
        except (ProviderUnavailable, TimeoutError):
            logger.info(
                "Could not release this process's give-back claims; they expire in %.0f s", self.lease
            )

    async def owe(self, owed: Owed) -> bool:
        """Keep `owed` until `made` is called for it; False when it could not be kept anywhere (the
        store did not answer and the spool could not be written: logged as an ERROR)."""
        try:
            await self.store.add([owed], self.token, self.lease)
            return True
        except ProviderUnavailable:
            pass
        except Exception as exc:
            # Any other refusal of the store (a corrupt file, a read-only replica after a
            # failover) must not lose the give-back either: the spool keeps it.
            faults.error("The give-back store refused an owed give-back: %s", type(exc).__name__)
        try:
            await asyncio.to_thread(self.spool.owe, owed, self.token)
            return True
        except OSError as exc:
            logger.error(
                "The give-back for request key %s could not be kept (the store does not answer and "
                "%s cannot be written: %s): only this process retries it",
                owed.request_key,
                self.spool.path,
                exc.strerror or type(exc).__name__,
            )
            return False

    async def made(self, slot: Slot) -> None:
        """Forget a give-back that was made (or can never be). When the store does not answer, the
        spool says so; failing that too, a later round tells the store (should this process stop
        first, another makes it again, which the provider's idempotent `give_back` turns into
        nothing)."""
        try:
            await self.store.remove([slot])
            return
        except ProviderUnavailable:
            pass
        except Exception as exc:
            faults.error("The give-back store refused a made give-back: %s", type(exc).__name__)
        try:
            await asyncio.to_thread(self.spool.made, slot)
        except OSError:
            self._unrecorded.add(slot)

    async def import_spool(self) -> int:
        """Move the spool's give-backs into the store; how many were owed. `ProviderUnavailable`
        when the store does not answer (the spool is left as it was)."""
        with self.spool.importing() as alone:
            if not alone:
                return 0  # another process (or round) is moving it; its lines are not lost
            taken = await asyncio.to_thread(self.spool.take)
            if taken is None:
                return 0
            await self._keep(taken)
            await asyncio.to_thread(self.spool.drop, taken)
            return len(taken.owed)

    async def _keep(self, taken: Taken) -> None:
        mine = [owed for owed, by in taken.owed.values() if by == self.token]
        others = [owed for owed, by in taken.owed.values() if by != self.token]
        if mine:
            # Still being retried here: claimed, so no other process makes it at the same time.
            await self.store.add(mine, self.token, self.lease)
        if others:
            await self.store.add(others, None, 0.0)
        if taken.made:
            await self.store.remove(taken.made)

    async def claim(self) -> list[Owed]:
        """Renew this process's claims, then claim what nobody else is making."""
        if self._unrecorded:
            done = list(self._unrecorded)
            await self.store.remove(done)
            self._unrecorded.difference_update(done)
        await self.store.renew(self.token, self.lease)
        return await self.store.claim(self.token, self.lease, CLAIM_BATCH)

    async def _run(self, make: Callable[[Owed], None]) -> None:
        while True:
            try:
                imported = await self.import_spool()
                if imported:
                    logger.info(
                        "Moved %d owed give-back(s) from %s into the store", imported, self.spool.path
                    )
                for owed in await self.claim():
                    make(owed)
            except ProviderUnavailable:
                pass  # the store is away; the next round tries again
            except Exception as exc:
                faults.error("Could not look for owed give-backs: %s", type(exc).__name__)
            await asyncio.sleep(self.period)


#: The give-back store's file in the data directory when no `database_url` is set: every process of
#: one data directory shares it.
GIVE_BACKS_FILE: Final = "give-backs.sqlite3"


def outbox_for(
    database_url: str | None, data_dir: Path, budget: DatabaseBudget, *, period: float
) -> GiveBackOutbox:
    """The outbox on the database every process of the agent shares (`database_url`), else on a
    file of the data directory; its spool is always in the data directory."""
    if database_url is None:
        engine: Engine = SQLiteDatabase(data_dir / GIVE_BACKS_FILE, timeout=budget.timeout_seconds)
    else:
        engine = engine_for(parse_database_url(database_url), budget)
    return GiveBackOutbox(give_back_store(engine), data_dir / SPOOL_FILE, period=period)
