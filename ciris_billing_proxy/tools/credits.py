"""`ciris-billing-proxy credits show|grant|adjust|audit`: the admin routes' work from a shell, on the
ledger of the configured provider (its database: `--database-url`, or the data directory's file),
without a server. Every change is kept in the journal with who (`cli:` and the login name), why (a
reason code) and when, as the admin routes keep theirs (docs/credits.md).

Exit codes: 0 done; 1 refused (a correction beyond the balance, a key used for another change, a
user without records); 2 the configuration or the request is invalid, or the store cannot be reached.
"""

from __future__ import annotations

import getpass
import json
from typing import Any, TextIO

from pydantic import ValidationError

from ..bodies import describe
from ..config import BillingConfig, ConfigError
from ..credit_models import AdminBalance, AdminGrantRequest, GrantInfo, JournalLine, parse_instant
from ..credit_routes import KEY_REUSED, NO_RECORDS, OVERDRAWN, change_credit
from ..errors import ProviderUnavailable
from ..ledger import Account, KeyReused, Ledger, Overdrawn, iso
from ..providers.registry import create_provider
from ..setup import provider_context

EXIT_OK = 0
EXIT_REFUSED = 1


async def credits_command(config: BillingConfig, args: Any, out: TextIO) -> int:
    """Run `credits ACTION` (`args`: the parsed command line) and print its outcome on `out`."""
    provider = create_provider(config.provider, provider_context(config))
    ledger = provider.credit_ledger
    if ledger is None:
        raise ConfigError(f"the {config.provider!r} provider keeps no credit ledger")
    await ledger.open()
    try:
        return await _run(ledger, config, args, out)
    except ProviderUnavailable:
        raise ConfigError("the store cannot be reached; nothing was changed") from None
    finally:
        await ledger.close()


async def _run(ledger: Ledger, config: BillingConfig, args: Any, out: TextIO) -> int:
    namespace = args.namespace or config.identity_namespace
    if args.action == "audit":
        since = None if args.since is None else iso(_instant(args.since).timestamp())
        entries, total = await ledger.journal(
            namespace=namespace if args.user or args.namespace else None,
            user_id=args.user,
            since=since,
            kind=args.kind,
            limit=args.limit,
        )
        _print(out, {"total_count": total, "entries": [JournalLine.of(e).model_dump() for e in entries]})
        return EXIT_OK
    account = Account(namespace, args.user)
    if args.action == "show":
        balance, grants = await ledger.balance(account), await ledger.grants(account)
        if not grants and not balance.used:
            print(NO_RECORDS, file=out)
            return EXIT_REFUSED
        now = ledger.clock()
        _print(
            out,
            {
                "user_id": account.user_id,
                "namespace": account.namespace,
                "balance": AdminBalance.of(balance).model_dump(),
                "grants": [GrantInfo.of(g, now).model_dump() for g in grants],
            },
        )
        return EXIT_OK
    fields = {"amount": args.amount, "reason": args.reason, "kind": args.kind, "note": args.note}
    if args.action == "grant":
        if args.amount <= 0:
            raise ConfigError("credits grant: the amount must be positive (credits adjust takes credit back)")
        fields["expires_at"] = args.expires_at
    try:
        change = AdminGrantRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"credits {args.action}: {describe(exc)}") from None
    expiry = change.expiry()
    if expiry is not None and expiry <= ledger.clock():
        raise ConfigError("credits grant: --expires-at must be in the future")
    try:
        reply = await change_credit(ledger, account, change, actor=f"cli:{_login()}", key=args.key)
    except Overdrawn as exc:
        print(OVERDRAWN.format(balance=exc.balance), file=out)
        return EXIT_REFUSED
    except KeyReused:
        print(KEY_REUSED, file=out)
        return EXIT_REFUSED
    _print(out, reply.model_dump())
    return EXIT_OK


def _instant(value: str) -> Any:
    try:
        return parse_instant(value)
    except ValueError:
        raise ConfigError(f"--since: {value!r} is not an ISO 8601 date-time") from None


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return "unknown"


def _print(out: TextIO, data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2), file=out)
