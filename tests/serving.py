"""Run `ciris-billing-proxy serve` as a real subprocess and wait until it listens, and talk to a
served agent over real HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ciris_billing_proxy.testing import TokenFactory

from .default_paths import CREDITS, LOGIN

#: The command line of `ciris-billing-proxy` as the tests run it (the installed script may be stale).
COMMAND = (sys.executable, "-m", "ciris_billing_proxy")
LISTENING = re.compile(r"Listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRIS_", "STRIPE_"))}
    env.update(extra)
    return env


@contextmanager
def serve(args: Sequence[str], data_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    cmd = [
        *COMMAND,
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *args,
    ]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or clean_env()
    )
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + 30
    url = None
    while url is None:
        line = process.stdout.readline()
        if not line:
            process.wait(5)
            raise AssertionError(f"server exited ({process.returncode}) before listening:\n{''.join(output)}")
        output.append(line)
        match = LISTENING.search(line)
        if match:
            url = match.group(1)
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("server did not start within 30 s")
    output.append(process.stdout.readline())  # the provider line
    server = Server(url, process, output)
    # Read on while it serves: `serve` logs a line per request, and a full pipe would stall it.
    reader = threading.Thread(target=lambda: output.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(15)
        process.stdout.close()


async def login(session: aiohttp.ClientSession, url: str, username: str, password: str) -> str:
    """A token from the agent at `url`'s login route."""
    async with session.post(f"{url}{LOGIN}", json={"username": username, "password": password}) as r:
        assert r.status == 200, await r.text()
        token: str = (await r.json())["access_token"]
        return token


async def get_credits(port: int, tokens: TokenFactory) -> object:
    """A user's `/credits` from an agent served on a loopback port."""
    url = f"http://127.0.0.1:{port}{CREDITS}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=tokens.headers("zoe")) as resp:
        assert resp.status == 200
        return await resp.json()
