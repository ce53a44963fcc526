"""Give-backs owed while the store does not answer: JSON lines in a file of the data directory.

Each line is written in one `write` and fsync'd before the caller goes on, so a line that was
written survives a crash or a power cut. A line says a give-back is owed (`owe`, with what the
provider needs to make it and, in `by`, the process that is retrying it) or that one owed earlier
was made (`made`). Every process of one data directory appends to the same file under an exclusive
`flock`; one of them at a time moves its lines into the store once it answers again (`take`, then
`drop`), and lines appended meanwhile are kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..store.give_backs import Owed

logger = logging.getLogger("ciris_billing_proxy")

SPOOL_FILE: Final = "give-backs-owed.jsonl"

Slot = tuple[tuple[str, str], str]


@dataclass
class Taken:
    """What the spool held, up to `size` bytes: give-backs still owed (each with the token of the
    process that wrote it), and the slots of those made since."""

    size: int
    owed: dict[Slot, tuple[Owed, str]] = field(default_factory=dict)
    made: set[Slot] = field(default_factory=set)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path

    def owe(self, owed: Owed, by: str) -> None:
        self._append({"owe": owed.to_json(), "by": by})

    def made(self, slot: Slot) -> None:
        (namespace, user_id), key = slot
        self._append({"made": [namespace, user_id, key]})

    @contextmanager
    def importing(self) -> Iterator[bool]:
        """Whether this caller may move the spool into the store now: True for one caller at a
        time, in every process of the data directory, until the block ends. `take` and `drop` lock
        the spool each on its own, so two importers between them would drop lines appended after
        the first one's `drop`; holding this across take, store and drop keeps them one at a time."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".import"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _append(self, line: dict[str, object]) -> None:
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._locked(os.O_RDWR | os.O_APPEND | os.O_CREAT) as fd:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                # A line cut short by a crash: end it, so it costs only itself, not this one too.
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)

    def take(self) -> Taken | None:
        """What the spool holds (None when it holds nothing). The file is left as it is: `drop`
        it once its give-backs are kept elsewhere."""
        try:
            with self._locked(os.O_RDONLY) as fd, os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        if not data:
            return None
        # A last line cut short (a process killed while writing it) is left as it is: every
        # complete line ends with a newline, and the next append ends that one first.
        size = data.rfind(b"\n") + 1
        taken = Taken(size)
        for number, raw in enumerate(data[:size].splitlines(), 1):
            try:
                line = json.loads(raw)
                if "made" in line:
                    namespace, user_id, key = (str(part) for part in line["made"])
                    slot = ((namespace, user_id), key)
                    taken.owed.pop(slot, None)
                    taken.made.add(slot)
                else:
                    owed = Owed.from_json(line["owe"])
                    taken.owed[owed.slot] = (owed, str(line.get("by", "")))
            except (ValueError, TypeError, KeyError):
                logger.error("Skipping line %d of %s: not an owed give-back", number, self.path)
        return taken

    def drop(self, taken: Taken) -> None:
        """Remove the first `taken.size` bytes: lines appended since `take` stay."""
        with self._locked(os.O_RDWR) as fd:
            os.lseek(fd, taken.size, os.SEEK_SET)
            rest = b""
            while chunk := os.read(fd, 65536):
                rest += chunk
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, rest)
            os.ftruncate(fd, len(rest))
            os.fsync(fd)

    @contextmanager
    def _locked(self, flags: int) -> Iterator[int]:
        if flags & os.O_CREAT:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Owner-only: the lines name users.
        fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)
