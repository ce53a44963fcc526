"""`ciris-billing-proxy serve` runs the demo agent; `ciris-billing-proxy qa` checks any agent;
`ciris-billing-proxy migrate` brings a database's schemas up to date; `ciris-billing-proxy reconcile`
makes the give-backs still owed; `ciris-billing-proxy users logout NAME` ends every session of a user;
`ciris-billing-proxy openapi` prints the API description."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from .. import __version__
from ..auth import _MAX_CLAIM, _MAX_NAMESPACE
from ..bad_requests import ServeRunner
from ..config import BillingConfig, ConfigError, default_data_dir
from ..database_url import parse_database_url
from ..errors import ProviderUnavailable
from ..ledger import ENTRY_KINDS, GRANT_KINDS, REASONS
from ..openapi import openapi_document
from ..ops.logs import (
    ACCESS_LOGGER,
    LOG_FORMATS,
    LOG_LEVELS,
    AccessLogger,
    LogFormat,
    configure_logging,
    quiet_lost_connections,
)
from ..ops.metrics import MULTIPROC_DIR_VAR
from ..paths import DEFAULT_LOGIN_PATH, DEFAULT_PREFIX
from ..store.choose import change_feed_for
from ..store.migrate import migrate
from .credits import credits_command
from .demo import (
    CreatedUser,
    create_demo_app,
    load_or_create_secret,
    load_or_create_users,
    reset_users,
    save_users,
    saved_usernames,
)
from .qa import QAError, print_report, run_qa
from .reconcile import reconcile
from .users import UserStore, end_sessions_of_new_passwords
from .workers import Supervisor, reserve_port

if TYPE_CHECKING:
    from ..testing.fake_backend import FakeBillingBackend
    from ..testing.fake_stripe_api import FakeStripeAPI

#: Seconds `serve` gives a connection to send a complete request head (see `make_runner`).
DEFAULT_IDLE_TIMEOUT = 30.0
#: Every `serve` flag not given reads `CIRIS_BILLING_` + its name (`--idle-timeout`:
#: `CIRIS_BILLING_IDLE_TIMEOUT`); a repeatable flag's variable is plural and holds one value a line
#: (`--user`: `CIRIS_BILLING_USERS`). A flag given wins over its variable.
SERVE_ENV_PREFIX = "CIRIS_BILLING_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


#: A `--user` line: NAME:PASSWORD[:EMAIL[:ROLE]].
UserLine = tuple[str, str, str | None, str | None]


def _user(value: str) -> UserLine:
    parts = value.split(":")
    if len(parts) not in (2, 3, 4) or not parts[0] or not parts[1]:
        # Only the name is shown, and only when there is a colon: without one, the whole value may
        # be a password.
        got = f", got {parts[0]!r}:…" if len(parts) > 1 else ""
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD[:EMAIL[:ROLE]]{got}")
    email = parts[2] if len(parts) >= 3 and parts[2] else None
    role = parts[3] if len(parts) == 4 and parts[3] else None
    return parts[0], parts[1], email, role


def _option(value: str) -> tuple[str, str]:
    key, sep, setting = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            "expected KEY=VALUE, e.g. free_uses=5"
        )  # never echoed: may be a secret
    return key.strip(), setting


def _user_id(value: str) -> str:
    # What the token verifier accepts as `sub`: any other name is no user's, and ending its
    # sessions would report success while refusing nothing.
    if not 0 < len(value) <= _MAX_CLAIM:
        raise argparse.ArgumentTypeError(f"a user id is 1-{_MAX_CLAIM} characters, got {len(value)}")
    return value


def _namespace(value: str) -> str:
    # The verifier reads a token's `oauth_provider` `oauth:google` as the namespace `google`.
    namespace = value.removeprefix("oauth:")
    if not 0 < len(namespace) <= _MAX_NAMESPACE:
        raise argparse.ArgumentTypeError(f"a namespace is 1-{_MAX_NAMESPACE} characters, got {value!r}")
    return namespace


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return seconds


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 64")
    return count


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


def _log_format(value: str) -> LogFormat:
    for name in LOG_FORMATS:
        if value.lower() == name:
            return name
    raise argparse.ArgumentTypeError(f"expected text or json, got {value!r}")


def _url_path(value: str) -> str:
    if not value.startswith("/") or "//" in value or " " in value:
        raise argparse.ArgumentTypeError(
            f"expected an absolute URL path such as /v1/auth/login, got {value!r}"
        )
    return value.rstrip("/") or "/"


class _Repeatable(argparse._AppendAction):
    """A repeatable flag whose first use replaces the default (its environment variable's
    values) instead of adding to it: a flag given wins over its variable."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def serve_env_var(action: argparse.Action) -> str:
    """The environment variable of one `serve` flag (see `SERVE_ENV_PREFIX`)."""
    name = next(o for o in action.option_strings if o.startswith("--")).removeprefix("--")
    plural = "S" if isinstance(action, argparse._AppendAction) else ""
    return SERVE_ENV_PREFIX + name.upper().replace("-", "_") + plural


def serve_flags(serve: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags of `serve` that take settings (all but --help)."""
    return [a for a in serve._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@dataclass(frozen=True)
class _BadVariable:
    """The default of a flag whose variable holds a bad value: an error once `serve` runs (other
    commands do not read the variables)."""

    message: str


def _defaults_from_env(serve: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Make each flag's variable its default, converted and checked as the flag would be, and
    name the variable in the flag's help. A bad value names the variable, never its value (it may
    hold a password)."""
    for action in serve_flags(serve):
        var = serve_env_var(action)
        action.help = f"{action.help}; env {var}" if action.help else f"env {var}"
        raw = environ.get(var)
        if not raw:  # unset or empty: the flag's own default
            continue
        try:
            action.default = _from_env(action, raw)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            action.default = _BadVariable(f"{var}: {exc}")


def _from_env(action: argparse.Action, raw: str) -> object:
    if action.nargs == 0:  # a switch such as --fake-backend or --no-access-log
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise argparse.ArgumentTypeError("expected 1/true/yes/on or 0/false/no/off")
        # True means as if the switch were given (`const`: False for --no-access-log's store_false).
        return action.const if word in _TRUE else action.default
    convert: Callable[[str], object] = action.type if callable(action.type) else str
    if isinstance(action, argparse._AppendAction):
        return [convert(line.strip()) for line in raw.splitlines() if line.strip()]
    return convert(raw)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; `serve`'s flags default to their environment variables in `environ`
    (the process environment when None)."""
    parser = argparse.ArgumentParser(
        prog="ciris-billing-proxy", description="Agent billing proxy for aiohttp applications."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the demo agent (login, billing routes, gated /v1/agent/interact)",
        description="Run the demo agent. Settings not given here come from CIRIS_* variables.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000)")
    _store_options(serve)
    serve.add_argument(
        "--user",
        type=_user,
        action=_Repeatable,
        default=[],
        metavar="NAME:PASSWORD[:EMAIL[:ROLE]]",
        help="a login for this run (repeatable; the password shows in ps: prefer --users-file or the "
        "variable); ROLE `admin` may use the admin routes (default OBSERVER); without any user given "
        "a demo user is created once",
    )
    serve.add_argument(
        "--cors-origin",
        action=_Repeatable,
        default=[],
        metavar="ORIGIN",
        help="a web origin (e.g. http://localhost:5173; * for any) whose pages may call the billing "
        "routes (repeatable; each value may also list several, comma-separated)",
    )
    serve.add_argument(
        "--users-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="logins for this run, one NAME:PASSWORD[:EMAIL[:ROLE]] a line (# comments and blank lines "
        "ignored), added to those of --user",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that has not sent a complete request head this long after it opened "
        f"or after its last response (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    serve.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    serve.add_argument(
        "--log-format",
        type=_log_format,
        default="text",
        metavar="FORMAT",
        help="text or json, one line per record on stderr (default text)",
    )
    serve.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=True,
        help="no INFO line per request",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the port and the store (default 1); a worker that dies is "
        "replaced, Ctrl-C or SIGTERM stops them all",
    )
    reconcile_cmd = commands.add_parser(
        "reconcile",
        help="list the give-backs still owed, and make them",
        description="List every give-back still owed (request key, user, age, attempts, why), kept in "
        "the store or in the data directory's spool, and make those no running process holds. "
        "Exits 0 when nothing is owed (any more), 1 when give-backs are still owed (with --dry-run: "
        "when any are), 2 when the configuration is invalid or the store cannot be reached.",
    )
    reconcile_cmd.add_argument("--dry-run", action="store_true", help="only list them; change nothing")
    _store_options(reconcile_cmd)
    _credits_parser(commands)
    migrate_cmd = commands.add_parser(
        "migrate",
        help="create or upgrade the store's tables, then exit",
        description="Create or upgrade the tables of every built-in record kind (servers also do it "
        "when they start). Exits 0 with a one-line summary, 2 when the database cannot be used.",
    )
    migrate_cmd.add_argument(
        "--database-url",
        default=os.environ.get("CIRIS_BILLING_DATABASE_URL") or None,
        required=not os.environ.get("CIRIS_BILLING_DATABASE_URL"),
        metavar="URL",
        help="postgresql://user@host:port/dbname or sqlite:///path (default: CIRIS_BILLING_DATABASE_URL)",
    )
    qa = commands.add_parser(
        "qa",
        help="run the billing QA checklist against a running agent",
        description="Check an agent's billing routes against the billing API (docs/billing-api.md in the "
        "ciris-billing-proxy repository): PASS / SKIP / FAIL per step. "
        "Exits 0 only when nothing failed.",
    )
    qa.add_argument("--url", required=True, help="the agent's base URL, e.g. http://127.0.0.1:8000")
    qa.add_argument("--username", required=True)
    qa.add_argument("--password", required=True)
    qa.add_argument("--return-url", default=None, help="return_url sent with the purchase")
    qa.add_argument(
        "--no-purchase",
        action="store_true",
        help="skip Initiate Purchase (each real one makes a PaymentIntent)",
    )
    qa.add_argument("--json", action="store_true", help="print a machine-readable report")
    qa.add_argument("--timeout", type=_seconds, default=30.0, help="seconds per request (default 30)")
    users_cmd = commands.add_parser(
        "users",
        help="manage the sessions of users",
        description="Act on users' sessions in the store every process of the agent shares.",
    )
    users_actions = users_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    logout = users_actions.add_parser(
        "logout",
        help="end every session of a user",
        description="Refuse every token of NAME issued until now (and any without an `iat` claim), in "
        "every process on the store within a second; the user signs in again. Exits 0 once recorded, "
        "2 when the store cannot be used.",
    )
    logout.add_argument("name", metavar="NAME", type=_user_id, help="the user id (a token's `sub`)")
    logout.add_argument(
        "--namespace",
        type=_namespace,
        default=os.environ.get("CIRIS_IDENTITY_NAMESPACE") or "local",
        help="the user's identity namespace (default: CIRIS_IDENTITY_NAMESPACE, else local)",
    )
    logout.add_argument("--data-dir", type=Path, default=None, help="the agent's data directory")
    logout.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="the agent's store (default: CIRIS_BILLING_DATABASE_URL, else the data directory's files)",
    )
    openapi = commands.add_parser(
        "openapi",
        help="print the API's OpenAPI 3.1 document (what {prefix}/openapi.json serves)",
        description="Print the OpenAPI 3.1 document of the billing routes and, unless --no-auth-routes, "
        "of login, logout, refresh and me.",
    )
    openapi.add_argument(
        "--prefix", type=_url_path, default=DEFAULT_PREFIX, help="the billing routes' prefix"
    )
    openapi.add_argument("--login-path", type=_url_path, default=DEFAULT_LOGIN_PATH, help="the login route")
    openapi.add_argument("--no-auth-routes", action="store_true", help="the app has no login routes")
    openapi.add_argument("--no-ui", action="store_true", help="the UI kit's files are not served")
    serve.add_argument(
        "--events-url",
        default=None,
        metavar="URL",
        help="POST every billing event here as a signed webhook (docs/events.md); needs --events-secret",
    )
    serve.add_argument(
        "--events-secret",
        default=None,
        metavar="SECRET",
        help="the secret webhooks are signed with, 16+ bytes (shows in ps: prefer the variable)",
    )
    serve.add_argument(
        "--fake-backend",
        action="store_true",
        help="run a fake CIRIS Billing backend in-process and use the ciris provider against it",
    )
    serve.add_argument(
        "--fake-stripe",
        action="store_true",
        help="run a fake Stripe API in-process and use the stripe provider against it (the paid flow "
        "offline, webhooks included)",
    )
    _defaults_from_env(serve, os.environ if environ is None else environ)
    return parser


def _credits_parser(commands: Any) -> None:
    credits_cmd = commands.add_parser(
        "credits",
        help="see, grant and correct users' credit on the ledger (simple provider)",
        description="What the admin routes do, from a shell, on the configured provider's ledger. Every "
        "change is journaled with who (cli:LOGIN), why (a reason code) and when. Exits 0 when done, 1 "
        "when refused (a correction beyond the balance, a key used for another change, a user without "
        "records), 2 when the configuration is invalid or the store cannot be reached.",
    )
    actions = credits_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="a user's balance and grants")
    grant = actions.add_parser("grant", help="grant credit to a user")
    adjust = actions.add_parser("adjust", help="correct a user's credit (negative takes it back)")
    audit = actions.add_parser("audit", help="the journal of credit changes, newest first")
    for action in (show, grant, adjust):
        action.add_argument("user", metavar="USER", type=_user_id, help="the user id (a token's `sub`)")
    for action in (grant, adjust):
        action.add_argument(
            "amount", metavar="AMOUNT", type=int, help="credits (adjust: negative takes back)"
        )
        action.add_argument("--reason", required=True, choices=sorted(REASONS), help="why (docs/credits.md)")
        action.add_argument(
            "--kind", choices=GRANT_KINDS, default=None, help="grant kind (default promotional)"
        )
        action.add_argument("--note", default=None, help="a note kept with the change")
        action.add_argument(
            "--key", default=None, metavar="KEY", help="an idempotency key: a repeat changes nothing"
        )
    grant.add_argument("--expires-at", default=None, metavar="ISO", help="when the grant expires (ISO 8601)")
    audit.add_argument("--user", type=_user_id, default=None, help="only this user's lines")
    audit.add_argument("--since", default=None, metavar="ISO", help="only lines from then on (ISO 8601)")
    audit.add_argument("--kind", choices=ENTRY_KINDS, default=None, help="only lines of this kind")
    audit.add_argument(
        "--limit", type=int, default=50, choices=range(1, 101), metavar="N", help="lines (1-100)"
    )
    for action in (show, grant, adjust, audit):
        action.add_argument(
            "--namespace", type=_namespace, default=None, help="the user's identity namespace (default local)"
        )
        _store_options(action)


def _store_options(command: argparse.ArgumentParser) -> None:
    """The options `serve` and `reconcile` share: which provider, and where state is kept."""
    command.add_argument("--provider", default=None, help="credit provider name (default simple)")
    command.add_argument(
        "--provider-option",
        type=_option,
        action=_Repeatable,
        default=[],
        metavar="KEY=VALUE",
        help="a provider setting (repeatable); wins over the provider's environment variables",
    )
    command.add_argument("--data-dir", type=Path, default=None, help="where state is kept")
    command.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="where the providers keep their records: postgresql://user@host:port/dbname, or "
        "sqlite:///path (default: CIRIS_BILLING_DATABASE_URL, else SQLite files in the data directory)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "qa":
        return _qa(args)
    if args.command == "openapi":
        login_path = None if args.no_auth_routes else args.login_path
        print(json.dumps(openapi_document(args.prefix, login_path, ui=not args.no_ui), indent=2))
        return 0
    if args.command == "serve":
        for value in vars(args).values():
            if isinstance(value, _BadVariable):
                print(f"ciris-billing-proxy serve: error: {value.message}", file=sys.stderr)
                return 2
    try:
        if args.command == "migrate":
            print(asyncio.run(migrate(args.database_url)))
            return 0
        if args.command == "users":
            return asyncio.run(_logout_user(args))
        if args.command == "reconcile":
            return _reconcile(args)
        if args.command == "credits":
            return _credits(args)
        return _serve(args)
    except ConfigError as exc:
        print(f"ciris-billing-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unusable data directory, mostly
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ciris-billing-proxy: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _qa(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(
            run_qa(
                args.url,
                args.username,
                args.password,
                return_url=args.return_url,
                purchase=not args.no_purchase,
                request_timeout=args.timeout,
                progress=sys.stderr,
            )
        )
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # QAError, and anything unforeseen: one line, never a traceback
        message = str(exc) if isinstance(exc, QAError) else f"unexpected {type(exc).__name__}: {exc}"
        print(f"ciris-billing-proxy qa: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"url": args.url, "passed": False, "error": message}))
        return 2
    print_report(report, as_json=args.json)
    return 0 if report.passed else 1


async def _logout_user(args: argparse.Namespace) -> int:
    database_url = args.database_url or os.environ.get("CIRIS_BILLING_DATABASE_URL") or None
    if database_url is not None:
        parse_database_url(database_url)  # a ConfigError naming what is wrong, never the password
    feed = change_feed_for(database_url, _data_dir(args))
    user = (args.namespace, args.name)
    await feed.open_store()
    try:
        epoch = float(math.floor(time.time()) + 1)
        await feed.move_epoch(user, epoch)
    except ProviderUnavailable:
        raise ConfigError("the store cannot be reached; nothing was changed") from None
    finally:
        await feed.close_store()
    await asyncio.sleep(max(epoch - time.time(), 0.0))
    shown = datetime.fromtimestamp(epoch, UTC).isoformat()
    print(f"Ended every session of {args.name} ({args.namespace}): tokens issued before {shown} are refused")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    overrides = _store_settings(args, _data_dir(args))
    jwt: dict[str, object] = {}
    if not (os.environ.get("CIRIS_JWT_SECRET") or os.environ.get("CIRIS_JWT_PUBLIC_KEY")):
        jwt["secret"] = secrets.token_urlsafe(48)  # never used: reconcile verifies and issues no token
    config = BillingConfig.from_env(**overrides, jwt=jwt)
    return asyncio.run(reconcile(config, dry_run=args.dry_run, out=sys.stdout))


def _credits(args: argparse.Namespace) -> int:
    overrides = _store_settings(args, _data_dir(args))
    jwt: dict[str, object] = {}
    if not (os.environ.get("CIRIS_JWT_SECRET") or os.environ.get("CIRIS_JWT_PUBLIC_KEY")):
        jwt["secret"] = secrets.token_urlsafe(48)  # never used: credits verifies and issues no token
    config = BillingConfig.from_env(**overrides, jwt=jwt)
    return asyncio.run(credits_command(config, args, sys.stdout))


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("CIRIS_BILLING_DATA_DIR") or default_data_dir())


def _store_settings(args: argparse.Namespace, data_dir: Path) -> dict[str, object]:
    """The config overrides of `_store_options`."""
    overrides: dict[str, object] = {"data_dir": data_dir}
    if args.provider:
        overrides["provider"] = args.provider
    if args.provider_option:
        overrides["provider_options"] = dict(args.provider_option)
    if args.database_url:
        overrides["database_url"] = args.database_url
    return overrides


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    data_dir = _data_dir(args)
    overrides = _store_settings(args, data_dir)
    if args.fake_backend:
        if args.provider not in (None, "ciris"):
            raise ConfigError("--fake-backend works with the ciris provider only")
        overrides["provider"] = "ciris"
    if args.fake_stripe:
        if args.fake_backend or args.provider not in (None, "stripe"):
            raise ConfigError("--fake-stripe works with the stripe provider only")
        overrides["provider"] = "stripe"
    if args.cors_origin:
        # A value may list several (CIRIS_BILLING_CORS_ORIGINS is comma-separated, as in the config).
        overrides["cors_origins"] = tuple(
            origin.strip() for value in args.cors_origin for origin in value.split(",") if origin.strip()
        )
    for name in ("events_url", "events_secret"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    jwt: dict[str, object] = {}
    if not (os.environ.get("CIRIS_JWT_SECRET") or os.environ.get("CIRIS_JWT_PUBLIC_KEY")):
        # No key configured: keep a generated one in the data directory so tokens survive restarts.
        jwt["secret"] = load_or_create_secret(data_dir)
    config = BillingConfig.from_env(**overrides, jwt=jwt)
    created = None
    if args.users_file is not None:
        # Through the same list as --user: one way users are added, whichever way they came.
        args.user = [*args.user, *read_users_file(args.users_file)]
    if args.user:
        users = UserStore()
        for name, password, email, role in args.user:
            try:
                users.add(name, password, email=email, role=role or "OBSERVER")
            except ValueError as exc:  # the same name twice, in any case
                raise ConfigError(f"--user: {exc}") from None
    else:
        users, created = load_or_create_users(config.data_dir)
    _end_sessions_of_new_passwords(config, users)
    if args.workers > 1:
        return _serve_workers(config, users, created, args)
    return asyncio.run(_start(config, users, created, args))


def _end_sessions_of_new_passwords(config: BillingConfig, users: UserStore) -> None:
    """Every source of users goes through here once, before any process serves: a user whose
    password changed since the last start loses the sessions of the old one (`tools.users`)."""
    database_url = config.database_url.get_secret_value() if config.database_url else None
    feed = change_feed_for(database_url, config.data_dir)
    try:
        asyncio.run(end_sessions_of_new_passwords(users, feed, config.identity_namespace))
    except ProviderUnavailable:
        raise ConfigError("the store keeping sessions cannot be reached") from None


def read_users_file(path: Path) -> list[UserLine]:
    """The logins of a users file: one NAME:PASSWORD[:EMAIL[:ROLE]] a line; blank lines and lines
    starting with # are skipped. A bad line is a `ConfigError` naming its number, never its text."""
    users = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            users.append(_user(line.strip()))
        except argparse.ArgumentTypeError:
            raise ConfigError(f"{path}, line {number}: expected NAME:PASSWORD[:EMAIL[:ROLE]]") from None
    return users


def _serve_workers(
    config: BillingConfig, users: UserStore, created: CreatedUser | None, args: argparse.Namespace
) -> int:
    if args.fake_backend or args.fake_stripe:
        fake = "--fake-backend" if args.fake_backend else "--fake-stripe"
        raise ConfigError(f"{fake} keeps its state in one process: it cannot run with --workers")
    create_demo_app(config, users)  # every setting is checked once, here, before any worker starts
    _announce_users(config, users, created, args)
    try:
        reserved = reserve_port(args.host, args.port)
    except OSError as exc:
        print(
            f"ciris-billing-proxy: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr
        )
        return 1
    with reserved:
        port = reserved.getsockname()[1]

        def worker(ready: multiprocessing.connection.Connection) -> int:
            return _guarded(lambda: asyncio.run(_start(config, users, None, args, port=port, ready=ready)))

        def listening() -> None:
            _print_listening(config, [reserved.getsockname()], f"; {args.workers} worker processes")

        # One scrape of any worker reports them all: prometheus-client's multiprocess mode, in a
        # directory of this run's own (set before the workers fork, removed when they are gone).
        metrics_dir = tempfile.mkdtemp(prefix="ciris-billing-metrics-")
        os.environ[MULTIPROC_DIR_VAR] = metrics_dir
        try:
            # A dead worker's counts stay (counters only grow); its live gauges go with it.
            return Supervisor(
                args.workers,
                worker,
                on_exit=lambda pid: mark_process_dead(pid, metrics_dir),  # type: ignore[no-untyped-call]
            ).run(listening)
        finally:
            del os.environ[MULTIPROC_DIR_VAR]
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _guarded(run: Callable[[], int]) -> int:
    """A worker's exit code, with `main`'s one-line errors."""
    try:
        return run()
    except ConfigError as exc:
        print(f"ciris-billing-proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


async def _start(
    config: BillingConfig,
    users: UserStore,
    created: CreatedUser | None,
    args: argparse.Namespace,
    *,
    port: int | None = None,
    ready: multiprocessing.connection.Connection | None = None,
) -> int:
    """Serve one process; as a worker (`ready` given), on the reserved `port`, reporting on `ready`
    once it listens, and announcing nothing (the parent does)."""
    asyncio.get_running_loop().set_exception_handler(quiet_lost_connections)
    fake: FakeBillingBackend | None = None
    environ: dict[str, str] | None = None
    if args.fake_backend:
        # The testing kit (and its backend's dependencies) load only when the fake is asked for.
        from ..testing.fake_backend import FakeBillingBackend

        fake = FakeBillingBackend()
        url = await fake.start(host="127.0.0.1")
        # The fake's settings only, whatever CIRIS_BILLING_* the shell has, but for the auth mode:
        # the fake serves the native apps' ID-token mode too.
        environ = {k: v for k, v in os.environ.items() if k == "CIRIS_BILLING_AUTH_MODE"}
        options = {**config.provider_options, "api_url": url, "api_key": fake.api_key}
        if config.database_url is None:
            # The fake's payments live only as long as it does; with a database_url the records
            # go where it says, like every other provider's.
            options["database"] = ":memory:"
        config = config.model_copy(update={"provider_options": options})
    stripe_api: FakeStripeAPI | None = None
    if args.fake_stripe:
        stripe_api, config, environ = await _with_fake_stripe(config)
    try:
        app = create_demo_app(config, users, environ=environ, fake_backend=fake, fake_stripe_api=stripe_api)
        if ready is None:
            _announce_users(config, users, created, args)
        if fake is not None:
            print(
                f"Fake CIRIS Billing backend on {fake.url} (state in memory, gone at exit)\n"
                f"  confirm a payment: curl -X POST {fake.url}/_fake/payments/PAYMENT_ID/confirm\n"
                f"  fail or cancel one: .../PAYMENT_ID/fail, .../PAYMENT_ID/cancel\n"
                f"  app store purchases: any purchase token of 10+ characters succeeds once, one starting "
                f"'invalid' is refused (docs/ciris-provider.md: Fake store tokens)"
            )
        if stripe_api is not None:
            print(
                f"Fake Stripe API on {stripe_api.url} (state in memory, gone at exit); its webhooks go "
                f"to this agent's {config.prefix}/stripe/webhook\n"
                f"  pay in the page with 4242 4242 4242 4242 (4000 0000 0000 0002 is declined), or: "
                f"curl -X POST {stripe_api.url}/_fake/payment_intents/PAYMENT_ID/confirm\n"
                f"  refund or dispute one: .../PAYMENT_ID/refund (amount=CENTS for a part), "
                f".../PAYMENT_ID/dispute"
            )
        runner = make_runner(app, idle_timeout=args.idle_timeout, access_log=args.access_log)

        def listening(addresses: Sequence[Any]) -> None:
            if stripe_api is not None:
                bound = addresses[0]
                host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                stripe_api.webhooks.url = f"http://{host}:{bound[1]}{config.prefix}/stripe/webhook"

        return await _run(runner, args.host, args.port if port is None else port, config, ready, listening)
    finally:
        if fake is not None:
            await fake.stop()
        if stripe_api is not None:
            await stripe_api.stop()


#: The `stripe` provider's settings a shell may give `serve --fake-stripe` (what is sold); its keys
#: and API base are the fake's.
FAKE_STRIPE_KEPT: Final = frozenset(
    {"CIRIS_STRIPE_PACKS", "CIRIS_STRIPE_FREE_USES", "CIRIS_STRIPE_PLAN_NAME"}
)


async def _with_fake_stripe(config: BillingConfig) -> tuple[FakeStripeAPI, BillingConfig, dict[str, str]]:
    """Start the fake Stripe API (the testing kit loads only when it is asked for) and point the
    provider at it: its keys, API base and webhook secret; in-memory records unless `database_url`."""
    from ..testing.fake_stripe_api import FakeStripeAPI

    api = FakeStripeAPI()
    url = await api.start(host="127.0.0.1")
    # A second's delay, as a real webhook has: the page's status polls see `processing` first.
    api.webhooks.delay = 1.0
    environ = {k: v for k, v in os.environ.items() if k in FAKE_STRIPE_KEPT}
    options = {
        **config.provider_options,
        "secret_key": api.secret_key,
        "publishable_key": api.publishable_key,
        "webhook_secret": api.webhook_secret,
        "api_base": url,
    }
    if config.database_url is None:
        options["database"] = ":memory:"
    return api, config.model_copy(update={"provider_options": options}), environ


def _announce_users(
    config: BillingConfig, users: UserStore, created: CreatedUser | None, args: argparse.Namespace
) -> None:
    if created is not None:
        # Saved only now that the app is valid, so a user is never kept whose password was not shown.
        save_users(users, config.data_dir)
        # Bare, not repr-quoted: the value is pasted into a shell or a login form as printed.
        print(
            f"Created demo user {created.username} with password {created.password}\n"
            f"  (shown once; only its hash is kept in {config.data_dir})"
        )
    elif not args.user:
        names = ", ".join(saved_usernames(config.data_dir)) or "none"
        print(
            f"Demo users: {names} (created earlier; password not shown again)\n"
            f"  Lost it? Stop the server, {reset_users(config.data_dir)}"
        )


def make_runner(app: web.Application, *, idle_timeout: float, access_log: bool = False) -> web.AppRunner:
    """The runner `serve` uses (tests serve their apps with the same one): requests aiohttp's parser
    refuses get a JSON 400 and one log line without their bytes (`bad_requests`); `access_log`
    writes one line per request on `ciris_billing_proxy.access` (`ops.logs.AccessLogger`)."""
    return ServeRunner(
        app,
        handle_signals=False,
        access_log=logging.getLogger(ACCESS_LOGGER) if access_log else None,
        access_log_class=AccessLogger,
        # A client that hangs up after sending its request still gets its interaction run, and pays
        # for it. Cancelling instead would give the use back for work that was done (a hang-up just
        # before the reply would make interactions with side effects free) and would interrupt
        # handlers at any await. aiohttp's default too, made explicit because the gate depends on it.
        handler_cancellation=False,
        # aiohttp arms this timer when a connection opens and again after each response, and closes
        # the connection if no complete request head has arrived when it fires: one bound for idle
        # keep-alive connections, connections that never send, and heads trickled byte by byte.
        keepalive_timeout=idle_timeout,
    )


async def _run(
    runner: web.AppRunner,
    host: str,
    port: int,
    config: BillingConfig,
    ready: multiprocessing.connection.Connection | None = None,
    listening: Callable[[Sequence[Any]], None] | None = None,
) -> int:
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=ready is not None)
        try:
            await site.start()
        except OSError as exc:
            print(
                f"ciris-billing-proxy: cannot listen on {host}:{port}: {exc.strerror}",
                file=sys.stderr,
            )
            return 1
        if listening is not None:
            listening(runner.addresses)
        if ready is None:
            _print_listening(config, runner.addresses)
        else:
            ready.send(True)
            ready.close()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def _print_listening(config: BillingConfig, addresses: Sequence[Any], workers: str = "") -> None:
    for address in addresses:
        bound_host, bound_port = address[0], address[1]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"Listening on http://{shown}:{bound_port}")
    records = ""
    if config.database_url is not None:
        records = f"; records in {parse_database_url(config.database_url.get_secret_value()).describe()}"
    print(
        f"Credit provider: {config.provider}; billing routes under {config.prefix}; "
        f"data in {config.data_dir}{records}{workers}",
        flush=True,
    )
