"""`ciris-billing-proxy reconcile`: list the give-backs still owed, and make them, without serving.

What is owed is what the give-back outbox keeps (`ops/outbox.py`): rows in the store, and lines in
the data directory's spool written while the store did not answer. A serving process makes them by
itself; this is for an operator who wants to see them, or to make them while nothing serves.
Rows a running process holds a live claim on are listed but left to it.

Exit codes: 0 nothing is owed (any more); 1 give-backs are still owed (with `--dry-run`: some are
owed; else: some could not be made now, or a running process holds them: run it again later);
2 the configuration is invalid or the store cannot be reached.
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from ..config import BillingConfig
from ..errors import BillingError, ProviderUnavailable
from ..ops.outbox import CLAIM_BATCH, GiveBackOutbox, outbox_for
from ..providers.base import CreditProvider
from ..providers.registry import create_provider
from ..setup import provider_context
from ..store.give_backs import Owed

EXIT_NOTHING_OWED = 0
EXIT_STILL_OWED = 1


async def reconcile(config: BillingConfig, *, dry_run: bool, out: TextIO) -> int:
    """List what is owed on `out`, then (unless `dry_run`) make it; the exit code."""
    database_url = config.database_url.get_secret_value() if config.database_url else None
    outbox = outbox_for(
        database_url, config.data_dir, config.database_budget, period=config.give_back_retry_max_seconds
    )
    provider = None if dry_run else create_provider(config.provider, provider_context(config))
    await outbox.open()
    try:
        if dry_run:
            owed = await _owed_without_moving(outbox)
        else:
            await outbox.import_spool()
            owed = await outbox.store.all()
        _list(owed, out)
        if dry_run or not owed or provider is None:
            return EXIT_STILL_OWED if owed else EXIT_NOTHING_OWED
        made = await _make(outbox, provider, out)
        left = len(await outbox.store.all())
        print(f"Made {made} give-back(s); {left} still owed.", file=out)
        return EXIT_STILL_OWED if left else EXIT_NOTHING_OWED
    finally:
        await outbox.close()


async def _owed_without_moving(outbox: GiveBackOutbox) -> list[Owed]:
    """The store's rows and the spool's lines, changing neither."""
    owed = {row.slot: row for row in await outbox.store.all()}
    taken = await asyncio.to_thread(outbox.spool.take)
    if taken is not None:
        for slot in taken.made:
            owed.pop(slot, None)
        for row, _by in taken.owed.values():
            owed.setdefault(row.slot, row)
    return sorted(owed.values(), key=lambda row: row.owed_since)


def _list(owed: list[Owed], out: TextIO) -> None:
    if not owed:
        print("No give-backs are owed.", file=out)
        return
    print(f"{len(owed)} give-back(s) owed:", file=out)
    print("request key\tuser\tage\tattempts\twhy", file=out)
    now = time.time()
    for row in owed:
        who = f"{row.identity.namespace}:{row.identity.user_id}"
        age = _age(now - row.owed_since)
        print(f"{row.request_key}\t{who}\t{age}\t{row.attempts}\t{row.why}", file=out)


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


async def _make(outbox: GiveBackOutbox, provider: CreditProvider, out: TextIO) -> int:
    """Claim every row no running process holds, make each once; how many were made."""
    made = 0
    await provider.start()
    try:
        while batch := await outbox.store.claim(outbox.token, outbox.lease, CLAIM_BATCH):
            done = []
            for row in batch:
                if await _make_one(provider, row, out):
                    done.append(row.slot)
            await outbox.store.remove(done)
            made += len(done)
            if len(done) < len(batch):
                break  # the provider cannot make the rest now: leave them for later
    finally:
        await outbox.stop()
        await provider.stop()
    return made


async def _make_one(provider: CreditProvider, row: Owed, out: TextIO) -> bool:
    """Whether the row is settled: made, or refused in a way retrying cannot change."""
    try:
        await provider.give_back_owed(row.identity, row.request_key, row.owed_since)
    except ProviderUnavailable:
        return False
    except BillingError as exc:
        print(f"Gave up on request key {row.request_key}: {type(exc).__name__}", file=out)
    except Exception as exc:  # a provider bug: named, and the row kept for a fixed version
        print(f"Could not make request key {row.request_key}: {type(exc).__name__}", file=out)
        return False
    return True
