"""What the benchmark processes share: the JWT secret, token minting, CPU pinning, /proc readings."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt

from ciris_billing_proxy.paths import CREDITS_ROUTE, DEFAULT_PREFIX

SECRET = "bench-secret-" + "b" * 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: What scenarios A-C request: the `/credits` route of a default setup.
CREDITS_PATH = DEFAULT_PREFIX + CREDITS_ROUTE


def pin(core: int) -> None:
    """Keep this process on one core (a no-op where the machine has fewer)."""
    cores = os.sched_getaffinity(0)
    if core in cores and len(cores) > 1:
        os.sched_setaffinity(0, {core})


def token(user_id: str, ttl: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": user_id, "iat": now, "exp": now + ttl, "email": f"{user_id}@bench.example"}, SECRET
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")
