"""How much of the database one process may take: connections per pool, and time per use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class DatabaseBudget:
    """What one process may take of the database (`BillingConfig.database_pool_size` and
    `database_timeout_seconds`): connections per pool (PostgreSQL), and the longest one use of the
    database may wait in all, queueing and locks and every statement of it included; past that it
    fails as `ProviderUnavailable` (503)."""

    pool_size: int = 10
    timeout_seconds: float = 10.0


DEFAULT_BUDGET: Final = DatabaseBudget()
