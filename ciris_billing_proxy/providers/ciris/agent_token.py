"""The user's ID token from the agent's environment, for an agent running on the user's own device.

The CIRIS apps send no ID-token header: they write the user's Google or Apple ID token into the agent's
environment (`CIRIS_BILLING_GOOGLE_ID_TOKEN` / `CIRIS_BILLING_APPLE_ID_TOKEN`) through its `.env`
file, and rewrite that file when the token expires. `AgentToken` reads the variables from the process
environment at startup and from the `.env` file whenever the file changes (its modification time and
size are looked at once a second at most, when a request needs the token: no file is read on every
request). When the backend refuses the token, `refused()` writes the refresh signal file the CIRIS apps
watch (`.token_refresh_needed`, holding the time), so the app signs in again silently and rewrites the
`.env` file, which the next look picks up without a restart.

The token is never logged, and the signal file holds no token.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from ...id_token import APPLE_HEADER, GOOGLE_HEADER, IdToken

logger = logging.getLogger("ciris_billing_proxy.ciris")

#: Variable -> the header an app would have sent it in (which issuer signed it). Google first, as
#: CIRIS reads them.
TOKEN_VARIABLES: Final = {
    "CIRIS_BILLING_GOOGLE_ID_TOKEN": GOOGLE_HEADER,
    "CIRIS_BILLING_APPLE_ID_TOKEN": APPLE_HEADER,
}
SIGNAL_NAME: Final = ".token_refresh_needed"
#: The `.env` file is looked at no more often than this.
RECHECK_SECONDS: Final = 1.0
#: A refused token is reported (a log line and the signal file) no more often than this.
REPORT_SECONDS: Final = 10.0


def parse_env_file(text: str) -> dict[str, str]:
    """`KEY=VALUE` lines as dotenv writes them: `export ` allowed, quotes stripped, `#` lines skipped."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def pick_token(values: Mapping[str, str]) -> IdToken | None:
    for variable, header in TOKEN_VARIABLES.items():
        value = values.get(variable, "").strip()
        if value:
            return IdToken(header, value, from_agent=True)
    return None


class AgentToken:
    def __init__(
        self,
        environ: Mapping[str, str],
        env_file: Path | None,
        signal_file: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env_file = env_file
        self.signal_file = signal_file
        self._clock = clock
        self._token = pick_token(environ)
        self._seen: tuple[int, int] | None = None
        self._next_look = float("-inf")
        self._next_report = float("-inf")

    def current(self) -> IdToken | None:
        now = self._clock()
        if self.env_file is not None and now >= self._next_look:
            self._next_look = now + RECHECK_SECONDS
            self._reload()
        return self._token

    def _reload(self) -> None:
        assert self.env_file is not None
        try:
            stat = self.env_file.stat()
        except OSError:
            return  # not written yet (or gone): keep what the environment gave
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        try:
            text = self.env_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            logger.warning("Could not read the agent's .env file for the user's ID token")
            return
        self._seen = seen
        token = pick_token(parse_env_file(text))
        if token is not None and token != self._token:
            self._token = token
            logger.info("The user's ID token was updated from the agent's .env file")

    def refused(self) -> None:
        """The backend refused the agent's token: ask the app for a fresh one (rate-limited)."""
        now = self._clock()
        if now < self._next_report:
            return
        self._next_report = now + REPORT_SECONDS
        # Look at the .env file again at once: the app may already have written a new token.
        self._next_look = now
        try:
            self.signal_file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.signal_file.with_name(self.signal_file.name + ".partial")
            partial.write_text(str(time.time()), encoding="utf-8")
            os.replace(partial, self.signal_file)
        except OSError:
            logger.warning(
                "The billing backend refused the agent's ID token; could not write the refresh signal"
            )
            return
        logger.warning(
            "The billing backend refused the agent's ID token (expired?); wrote the refresh signal %s",
            self.signal_file.name,
        )
