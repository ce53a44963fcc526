"""`serve --workers N`: N worker processes on one port, supervised by the parent.

The parent validates everything once, reserves the port (bound with `SO_REUSEPORT`, never listening,
so it stays this server's while workers come and go), then forks the workers; each builds its own
app and listens on that port with `SO_REUSEPORT`, and the kernel spreads connections over them.
They share the store and hear each other's changes through its change feed.

A worker that dies while serving is reported on stderr and replaced: the others keep serving
meanwhile. A worker that fails before it listens (a database unreachable at startup) stops them all,
with its exit code. SIGINT or SIGTERM stops every worker (each finishes its requests and its
money-moving work) and the parent exits 0.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Final

#: How long stopping workers may take (their requests and money-moving work) before they are killed.
STOP_SECONDS: Final = 30.0

#: A worker's body: given the pipe end on which it reports being ready, returns its exit code.
WorkerMain = Callable[[multiprocessing.connection.Connection], int]


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with `SO_REUSEPORT`; port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


#: How long a worker's clean exit waits for this process's own stop signal before counting as a death.
SHUTDOWN_GRACE_SECONDS = 0.5


@dataclass
class _Worker:
    number: int
    process: BaseProcess
    ready: multiprocessing.connection.Connection


class Supervisor:
    def __init__(self, count: int, main: WorkerMain, on_exit: Callable[[int], None] | None = None) -> None:
        """`on_exit(pid)` is called for each worker once it has exited (died, or stopped)."""
        self.count = count
        self.main = main
        self.on_exit = on_exit
        self._context = multiprocessing.get_context("fork")
        self._stop = threading.Event()

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start the workers, call `on_ready` once all listen, supervise until a signal."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _sig, _frame: self._stop.set())
        workers: list[_Worker] = []
        try:
            # One after the other: a worker that cannot start (its error printed once) stops the
            # rest from being started at all.
            for number in range(1, self.count + 1):
                workers.append(self._spawn(number))
                failed = self._wait_ready(workers[-1])
                if failed is not None:
                    return failed
            on_ready()
            while not self._stop.is_set():
                sentinels = [w.process.sentinel for w in workers]
                for sentinel in multiprocessing.connection.wait(sentinels, timeout=0.2):
                    index = sentinels.index(sentinel)  # type: ignore[arg-type]
                    dead = workers[index]
                    dead.process.join()
                    self._exited(dead)
                    # Ctrl-C in a terminal reaches every worker and this process at once: a worker
                    # that stopped cleanly because of it is the start of a shutdown, not a death to
                    # repair. A crash or a kill is repaired at once.
                    if dead.process.exitcode == 0 and self._stop.wait(SHUTDOWN_GRACE_SECONDS):
                        break
                    print(
                        f"ciris-billing-proxy: worker {dead.number} (pid {dead.process.pid}) "
                        f"{_how(dead.process.exitcode)}; starting a new one",
                        file=sys.stderr,
                        flush=True,
                    )
                    workers[index] = self._spawn(dead.number)
                    failed = self._wait_ready(workers[index])
                    if failed is not None:
                        return failed
            return 0
        finally:
            self._stop_all(workers)

    def _spawn(self, number: int) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_child, args=(self.main, child_end), daemon=False)
        process.start()
        child_end.close()
        return _Worker(number, process, parent_end)

    def _wait_ready(self, worker: _Worker) -> int | None:
        """None once the worker listens; its exit code (never 0) if it exits first; 0 if a signal
        asked to stop meanwhile."""
        while True:
            if worker.ready.poll(0.1):
                try:
                    worker.ready.recv()
                    return None
                except EOFError:
                    break
            if self._stop.is_set():
                return 0
            if not worker.process.is_alive():
                break
        worker.process.join(STOP_SECONDS)
        return worker.process.exitcode or 1

    def _stop_all(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)
        for worker in workers:
            worker.process.join(STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.ready.close()
            self._exited(worker)

    def _exited(self, worker: _Worker) -> None:
        if self.on_exit is not None and worker.process.pid is not None:
            self.on_exit(worker.process.pid)


def _child(main: WorkerMain, ready: multiprocessing.connection.Connection) -> None:
    # The parent's handlers were inherited with the fork: the worker installs its own in its loop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    sys.exit(main(ready))


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
