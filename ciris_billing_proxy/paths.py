"""Which request paths a prefix covers: the one rule for every prefix-scoped middleware."""

from __future__ import annotations


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    """True for a prefix itself and anything below it (`/v1/agent` covers `/v1/agent/x`, not
    `/v1/agents`)."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
