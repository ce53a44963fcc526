"""A small password user store for the demo agent and for hosts without a user system.

Only scrypt hashes are kept (never passwords), comparison is constant-time, and an unknown user costs
the same scrypt work as a known one so response time does not reveal which usernames exist.

A new password ends the sessions of the old one: whatever the users came from (`--user`, a users
file, the generated demo user), `end_sessions_of_new_passwords` compares each with the hash it last
started with (kept in the change feed's store) and moves the token epoch of each user whose password
changed, so the tokens issued before are refused by every process on the store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ..login import AuthenticatedUser
from ..store.changes import ChangeFeed
from ..throttle import fold_username

logger = logging.getLogger("ciris_billing_proxy")

# RFC 7914's interactive-login parameters: ~50 ms and 16 MiB per hash.
_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM)
    return "$".join(
        ["scrypt", str(_N), str(_R), str(_P), _b64(salt), _b64(digest)],
    )


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.urlsafe_b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


@dataclass(frozen=True, slots=True)
class StoredUser:
    username: str
    password_hash: str
    role: str = "OBSERVER"
    email: str | None = None
    #: ISO 8601, UTC; None for users saved before it was recorded.
    created_at: str | None = None


class UserStore:
    """Users by name. Names that differ only in case or Unicode form ("Bob", "bob", a full-width
    "bob") are one name: the login throttle counts them as one, so the store holds only one."""

    def __init__(self, users: list[StoredUser] | None = None) -> None:
        self._users: dict[str, StoredUser] = {}
        self._folded: dict[str, str] = {}  # folded name -> the name as stored
        for user in users or []:
            self._refuse_taken(user.username)
            self._insert(user)
        # Passwords given in plain (`add`), kept only until `changed_passwords` has compared them
        # with the hashes of the last start: a fresh salt makes every hash of one password differ.
        self._given: dict[str, str] = {}
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))
        # Each check costs 16 MiB and ~50 ms of CPU: a burst of logins queues instead of exhausting memory.
        self._hashing = asyncio.Semaphore(4)

    def __contains__(self, username: str) -> bool:
        return username in self._users

    def __len__(self) -> int:
        return len(self._users)

    def add(self, username: str, password: str, *, role: str = "OBSERVER", email: str | None = None) -> None:
        """Add a user; ValueError if the name, ignoring case and Unicode form, is taken."""
        self._refuse_taken(username)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        self._insert(StoredUser(username, hash_password(password), role.upper(), email, created))
        self._given[username] = password

    def _refuse_taken(self, username: str) -> None:
        taken = self._folded.get(fold_username(username))
        if taken is not None:
            raise ValueError(
                f"user {username!r} clashes with existing user {taken!r}: "
                "usernames that differ only in case or Unicode form are the same name"
            )

    def _insert(self, user: StoredUser) -> None:
        self._users[user.username] = user
        self._folded[fold_username(user.username)] = user.username

    async def verify_login(self, username: str, password: str) -> AuthenticatedUser | None:
        """The user, if `password` is theirs; None otherwise (an unknown name costs the same work).
        Made to be passed as `setup_billing(authenticate=store.verify_login)`."""
        user = self._users.get(username)
        encoded = user.password_hash if user else self._dummy_hash
        # scrypt is deliberately slow; keep it off the event loop.
        async with self._hashing:
            ok = await asyncio.to_thread(verify_password, password, encoded)
        if not ok or user is None:
            return None
        created = datetime.fromisoformat(user.created_at) if user.created_at else None
        return AuthenticatedUser(user_id=user.username, role=user.role, email=user.email, created_at=created)

    def password_hashes(self) -> dict[str, str]:
        return {name: user.password_hash for name, user in self._users.items()}

    async def changed_passwords(self, recorded: Mapping[str, str]) -> list[str]:
        """The users whose password is not the one `recorded` (username -> hash, as of the last
        start) holds a hash of. A user added here in plain whose password matches the recorded
        hash takes that hash back (so an unchanged `--user` stays unchanged across restarts);
        users not recorded are new, not changed. Forgets the plain passwords."""
        changed: list[str] = []
        given, self._given = self._given, {}
        for name, user in self._users.items():
            before = recorded.get(name)
            if before is None or before == user.password_hash:
                continue
            password = given.get(name)
            if password is not None:
                async with self._hashing:
                    same = await asyncio.to_thread(verify_password, password, before)
                if same:
                    self._users[name] = replace(user, password_hash=before)
                    continue
            changed.append(name)
        return changed

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump([asdict(u) for u in self._users.values()], fh, indent=2)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> UserStore:
        """The users `save` wrote to `path`. ValueError, saying what is wrong without quoting the
        file, when it is not such a file; OSError when it cannot be read."""
        return cls.load_rows(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def load_rows(cls, rows: object) -> UserStore:
        """The users of rows as `save` writes them (a JSON list of objects); ValueError otherwise."""
        if not isinstance(rows, list):
            raise ValueError("expected a JSON list of users")
        return cls([_stored_user(row) for row in rows])


_TEXT_FIELDS = ("username", "password_hash", "role")
_OPTIONAL_FIELDS = ("email", "created_at")


def _stored_user(row: object) -> StoredUser:
    if not isinstance(row, dict):
        raise ValueError("each user must be a JSON object")
    unexpected = sorted(set(row) - {*_TEXT_FIELDS, *_OPTIONAL_FIELDS})
    if unexpected:
        raise ValueError(f"unexpected user field(s): {', '.join(map(str, unexpected))}")
    for name in _TEXT_FIELDS:
        if not isinstance(row.get(name), str) or not row[name]:
            raise ValueError(f"a user has no {name}")
    for name in _OPTIONAL_FIELDS:
        if not isinstance(row.get(name), str | None):
            raise ValueError(f"a user's {name} is not text")
    user = StoredUser(**row)
    if user.created_at is not None:
        datetime.fromisoformat(user.created_at)  # a ValueError here too, not at the user's login
    return user


async def end_sessions_of_new_passwords(users: UserStore, feed: ChangeFeed, namespace: str) -> list[str]:
    """Move the token epoch of every user whose password changed since the last start (see the
    module docstring) and record the passwords of this start; the names whose sessions ended.
    Returns once the epoch has come, so tokens issued afterwards are not void (`iat` counts whole
    seconds). `DatabaseUnavailable` / `ProviderUnavailable` when the store cannot be used."""
    await feed.open_store()
    try:
        changed = await users.changed_passwords(await feed.recorded_passwords())
        epoch = float(math.floor(time.time()) + 1)
        for name in changed:
            await feed.move_epoch((namespace, name), epoch)
            logger.info("Ended every session of user %s: the password changed", name)
        await feed.record_passwords(users.password_hashes())
    finally:
        await feed.close_store()
    if changed:
        await asyncio.sleep(max(epoch - time.time(), 0.0))
    return changed
