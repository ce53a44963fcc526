"""`database_url`: which engine keeps the records, parsed once at config time.

Unset means SQLite files in the data directory. `sqlite:///path` puts every record kind in that one
file; `postgresql://user[:password]@host[:port]/dbname` (or `postgres://`) puts them in PostgreSQL.
Messages name the database by `describe()`, which never includes a password.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Final, Literal

from yarl import URL

POSTGRES_SCHEMES: Final = frozenset({"postgresql", "postgres"})
INSTALL_POSTGRES: Final = "pip install 'ciris-billing-proxy[postgres]'"


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    dialect: Literal["sqlite", "postgresql"]
    #: The SQLite file path, or the PostgreSQL DSN as given (it may carry a password).
    target: str

    def describe(self) -> str:
        if self.dialect == "sqlite":
            return f"SQLite file {self.target}"
        url = URL(self.target)
        user = f"{url.user}@" if url.user else ""
        port = f":{url.explicit_port}" if url.explicit_port else ""
        host = url.host or url.query.get("host") or "localhost"
        return f"PostgreSQL {user}{host}{port}{url.path}"


def parse_database_url(value: str) -> DatabaseURL:
    """The URL's engine and target; `ValueError` with a message that never repeats a password."""
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme == "sqlite":
        path = value[len("sqlite:///") :] if value.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError("a SQLite URL names a file: sqlite:///relative/path or sqlite:////absolute/path")
        return DatabaseURL("sqlite", path)
    if scheme not in POSTGRES_SCHEMES:
        raise ValueError(
            "must start with postgresql:// (or postgres://) or sqlite:///, "
            "e.g. postgresql://user@127.0.0.1:5432/dbname"
        )
    try:
        url = URL(value)
    except ValueError:
        raise ValueError("is not a valid PostgreSQL URL (check the host and port)") from None
    if url.path.strip("/") == "" or "/" in url.path.strip("/"):
        raise ValueError("must name one database: postgresql://user@host:port/dbname")
    if importlib.util.find_spec("asyncpg") is None:
        raise ValueError(f"PostgreSQL needs the asyncpg driver: {INSTALL_POSTGRES}")
    return DatabaseURL("postgresql", value)
