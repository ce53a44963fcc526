"""Logging for operators: what `serve` configures, the access log, and fault lines that stay
readable during an outage.

As a library the package configures no logging: it writes to its loggers (`ciris_billing_proxy`,
`ciris_billing_proxy.audit`) and the host decides where they go. `serve` calls `configure_logging`:
one handler on stderr, every line with time, level, logger, pid and request id, as text or JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import weakref
from typing import Any, ClassVar, Final, Literal

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from .request_id import RequestIdFilter, current_request_id

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(process)d] [%(request_id)s] %(message)s"
ACCESS_LOGGER: Final = "ciris_billing_proxy.access"
#: How long a repeated fault is summed up before its count is logged.
FAULT_WINDOW_SECONDS: Final = 10.0


class UTCTimes:
    """`2026-12-06T12:57:33.230Z` for a record or a moment; the part up to the second is made once
    per second (strftime is most of a line's cost otherwise: the access log writes one per request,
    the audit trail one per spend)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def of(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int(record.msecs):03d}Z"

    def iso(self, at: float) -> str:
        """`at` (seconds since the epoch) as the same text."""
        second = int(at)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int(at % 1 * 1000):03d}Z"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, pid, request_id, message, and
    the traceback as `exc` when there is one."""

    def __init__(self) -> None:
        super().__init__()
        self._times = UTCTimes()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._times.of(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "request_id": getattr(record, "request_id", None) or current_request_id.get() or "-",
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, times in UTC with milliseconds; the line is put together directly rather
    than through `Formatter`'s general machinery (same output)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._times = UTCTimes()

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or current_request_id.get() or "-"
        line = (
            f"{self._times.of(record)} {record.levelname} {record.name} [{record.process}] [{rid}] "
            f"{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """What `serve` does (never the library): every record of the process to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Neither is shown: skipping them saves work on every record (the access log writes one per
    # request).
    logging.logThreads = False
    logging.logMultiprocessing = False


ACCESS_FORMAT: Final = '%s "%s %s" %d %d %.1fms'
#: The most characters of a request's value (its path, method, address) an access line keeps;
#: the rest is cut and counted ("…[+2488 chars]"), so a long path cannot make a line of megabytes.
ACCESS_FIELD_LIMIT: Final = 512


def loggable(value: str, limit: int = ACCESS_FIELD_LIMIT) -> str:
    """`value`, as a request sent it, safe to put in a log line: a character that is not printable
    (a line break, NUL, an escape sequence's ESC, a Unicode line separator), `"` and `\\` written as
    `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN` (so a request cannot start a line of its own, close the
    quoted request of an access line or pass for an escape), and the characters after the first
    `limit` cut and counted. A value that needs none of it (nearly every one) is returned as it
    is after three C-level scans."""
    if len(value) <= limit and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    kept = value[:limit]
    escaped = "".join(c if c.isprintable() and c != '"' and c != "\\" else _escape(c) for c in kept)
    if len(value) > limit:
        escaped += f"…[+{len(value) - limit} chars]"
    return escaped


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class RecordTemplate:
    """Records of one logger at one level with one message format, made by copying a record made
    once instead of through `Logger.log`: no caller lookup, and no `LogRecord.__init__` (a third of
    a line's cost), only the arguments and the time set. For lines written per request (the access
    log, the audit trail); the caller checks `logger.isEnabledFor(level)` first. The template is
    made again in a forked child, whose pid differs."""

    __slots__ = ("_fields", "_level", "_msg", "_pid", "logger")

    def __init__(self, logger: logging.Logger, level: int, msg: str) -> None:
        self.logger = logger
        self._level = level
        self._msg = msg
        self._fields: dict[str, Any] = {}
        self._pid = -1

    def emit(self, args: tuple[object, ...], extra: dict[str, Any] | None = None) -> None:
        if self._pid != _getpid():
            made = self.logger.makeRecord(self.logger.name, self._level, "", 0, self._msg, (), None)
            self._fields = made.__dict__
            self._pid = _getpid()
        created_ns = _time_ns()
        record = _bare_record(logging.LogRecord)
        fields = record.__dict__ = self._fields.copy()
        fields["args"] = args
        fields["created"] = created = created_ns / 1e9
        fields["msecs"] = (created_ns % 1_000_000_000) // 1_000_000
        fields["relativeCreated"] = (created - _START) * 1000
        if extra is not None:
            fields.update(extra)
        self.logger.handle(record)


class AccessLogger(AbstractAccessLogger):
    """One INFO line per request on `ciris_billing_proxy.access`: client address, method, path,
    status, body size and milliseconds. Never a header or the query string (tokens travel there).
    What the request chose (its path, method, and an address a host's proxy middleware took from a
    header) goes through `loggable`: one line per request whatever it sent.

    Made as cheaply as logging allows: nothing at all when the logger is off (`enabled`); else a
    record copied from a template (`RecordTemplate`)."""

    __slots__ = ("_records",)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        # aiohttp makes one per connection, in the serving process.
        super().__init__(logger, log_format)
        self._records = RecordTemplate(logger, logging.INFO, ACCESS_FORMAT)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self._records.emit(
            (
                _loggable(request.remote or "-"),
                _loggable(request.method),
                _loggable(request.path),
                response.status,
                response.body_length,
                time * 1000,
            )
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


_bare_record = object.__new__
_loggable = loggable
_time_ns = time.time_ns
_getpid = os.getpid


def _logging_start() -> float:
    """When logging was loaded: what `LogRecord.relativeCreated` is measured from."""
    record = logging.LogRecord("", 0, "", 0, "", (), None)
    return record.created - record.relativeCreated / 1000


_START: Final = _logging_start()


class FaultLog:
    """A fault log line that an outage cannot turn into a flood: the first occurrence of a message
    is logged, repeats within `FAULT_WINDOW_SECONDS` are counted, and the count is logged once the
    window is over ("… 3,961 more in the last 10 s"), at the next occurrence or by a timer.

    Repeats are recognised by the message template (its arguments may differ), so a site names
    what failed in the template and passes only details as arguments."""

    #: Every instance, so that `forget_all` can start them afresh (a test that expects a line
    #: must not miss it because an earlier test logged the same one).
    _all: ClassVar[weakref.WeakSet[FaultLog]] = weakref.WeakSet()

    def __init__(self, logger: logging.Logger, window: float = FAULT_WINDOW_SECONDS) -> None:
        self.logger = logger
        self.window = window
        self._open: dict[tuple[int, str], list[float]] = {}  # (level, template) -> [start, repeats]
        FaultLog._all.add(self)

    @classmethod
    def forget_all(cls) -> None:
        """Forget what every fault log has seen (pending counts are dropped)."""
        for fault_log in cls._all:
            fault_log._open.clear()

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        key = (level, msg)
        now = time.monotonic()
        window = self._open.get(key)
        if window is not None:
            if now - window[0] < self.window:
                if window[1] == 0:
                    self._flush_later(key, window[0] + self.window - now)
                window[1] += 1
                return
            self._summarise(key)
        self._open[key] = [now, 0]
        self.logger.log(level, msg, *args)

    def _summarise(self, key: tuple[int, str]) -> None:
        window = self._open.pop(key, None)
        if window is None or not window[1]:
            return
        level, msg = key
        self.logger.log(
            level,
            "%s … %s more in the last %g s",
            msg.split("%", 1)[0].rstrip(": ") or msg,
            f"{int(window[1]):,}",
            self.window,
        )

    def _flush_later(self, key: tuple[int, str], delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the count is logged with the next occurrence
        loop.call_later(max(delay, 0.0), self._summarise, key)


def quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An event loop exception handler: a lost connection that nobody was waiting for any more is one
    DEBUG line, not an ERROR with a traceback; everything else goes to the loop's default handler.

    During a database outage asyncpg's connection attempts (sslmode `prefer`, its default) that are
    cancelled or time out while connecting leave a future that later fails with "unexpected
    connection_lost() call" and is never awaited: asyncio reports each one as "Future exception
    was never retrieved" with a traceback, a flood at shutdown (SIGTERM cancels them all). `serve`
    installs this handler; a host may too: `loop.set_exception_handler(quiet_lost_connections)`.
    """
    exc = context.get("exception")
    if isinstance(exc, ConnectionError) and context.get("message") == "Future exception was never retrieved":
        logging.getLogger("ciris_billing_proxy").debug(
            "A connection attempt ended after its caller left: %s", exc
        )
        return
    loop.default_exception_handler(context)
