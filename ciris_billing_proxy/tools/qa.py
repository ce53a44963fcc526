"""`ciris-billing-proxy qa`: run the billing checklist of `docs/billing-api.md` against any agent.

The checks read raw JSON, field by field, so a broken server is told *which* rule it breaks (a null
`credits_remaining`, an inconsistent `has_credit`, a missing `publishable_key`) instead of failing
on the first parse. No check prints a token or a Stripe client secret.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, TextIO, Union, get_args, get_origin

from pydantic import BaseModel

from ..client import (
    BillingAPIError,
    BillingClient,
    BillingClientError,
    BillingConnectionError,
    BillingNotEnabled,
    NotFoundError,
)
from ..models import (
    PAYMENT_STATES,
    TRANSACTION_EXTRAS,
    CreditStatusReply,
    PurchaseInitiated,
    PurchaseOptionsReply,
    PurchaseStatusReply,
    StoreVerificationReply,
    Transaction,
    TransactionPageReply,
    TransactionReply,
)
from ..paths import (
    CREDITS_ROUTE,
    DEFAULT_LOGIN_PATH,
    GOOGLE_PLAY_ROUTE,
    INITIATE_ROUTE,
    STATUS_ROUTE,
    TRANSACTIONS_ROUTE,
)
from ..products import ToolBalance

Result = Literal["PASS", "SKIP", "FAIL"]
#: The Python types `json.loads` may give for a field: what a check accepts.
JSONKinds = tuple[type, ...]


def _json_kinds(annotation: Any) -> JSONKinds:
    """What JSON a model field's annotation allows, as the types `json.loads` returns for it."""
    union = get_origin(annotation) in (Union, types.UnionType)
    kinds: list[type] = []
    for kind in get_args(annotation) if union else (annotation,):
        origin = get_origin(kind)
        if origin is Literal:
            kinds.append(type(get_args(kind)[0]))
        elif origin is not None:
            kinds.append(origin)  # list[...] is a JSON array
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            kinds.append(dict)
        else:
            kinds.append(kind)
    return tuple(dict.fromkeys(kinds))


def wire_fields(model: type[BaseModel], *, required_only: bool = False) -> dict[str, JSONKinds]:
    """The fields a reply of `model` carries, with the JSON each may hold, read from the wire
    models themselves so the checklist cannot drift from the contract the server and client use."""
    return {
        name: _json_kinds(info.annotation)
        for name, info in model.__pydantic_fields__.items()
        if info.is_required() or not required_only
    }


#: The `/credits` fields every agent must send (the additive extras may be left out).
CREDITS_REQUIRED_FIELDS: Final = wire_fields(CreditStatusReply, required_only=True)
#: The purchase reply as the UI needs it: the server's model, whose publishable key is required.
INITIATED_FIELDS: Final = wire_fields(PurchaseInitiated)
PURCHASE_OPTIONS_FIELDS: Final = wire_fields(PurchaseOptionsReply)
#: Every field, also those a client may default: the contract says they are sent.
PURCHASE_STATUS_FIELDS: Final = wire_fields(PurchaseStatusReply)
TRANSACTION_PAGE_FIELDS: Final = wire_fields(TransactionPageReply)
_ALL_TRANSACTION_FIELDS: Final = wire_fields(TransactionReply)
TRANSACTION_FIELDS: Final = {k: v for k, v in _ALL_TRANSACTION_FIELDS.items() if k not in TRANSACTION_EXTRAS}
#: Sent only when the provider has them (CIRIS's backend does): checked when present.
TRANSACTION_EXTRA_FIELDS: Final = {k: _ALL_TRANSACTION_FIELDS[k] for k in TRANSACTION_EXTRAS}
STORE_VERIFICATION_FIELDS: Final = wire_fields(StoreVerificationReply)
TOOL_BALANCE_FIELDS: Final = wire_fields(ToolBalance)
#: A purchase no store issued: every store refuses it (the fake backend refuses tokens starting
#: "invalid"), so the check adds no credit anywhere.
MADE_UP_PURCHASE: Final = {
    "purchase_token": "invalid-qa-check-not-a-real-purchase",
    "product_id": "credits_100",
    "package_name": "ai.ciris.qa",
}
TRANSACTION_TYPES: Final = get_args(Transaction.__pydantic_fields__["type"].annotation)


class QAError(Exception):
    """The checks could not run at all (unreachable URL, bad login): one line, exit 2."""


@dataclass
class Step:
    name: str
    result: Result
    reason: str


@dataclass
class Report:
    url: str
    steps: list[Step] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(step.result != "FAIL" for step in self.steps)


def _shown(value: Any) -> str:
    """A value as a reason may show it: scalars as they are, anything else by its JSON type only
    (so a misplaced client secret or token inside a list is never printed)."""
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "a value")


def _brief(detail: Any) -> str:
    """A server's error detail on one short line (an HTML page or a long text is cut)."""
    if not isinstance(detail, str):
        return "(details omitted)"
    line = " ".join(detail.split())
    return line if len(line) <= 120 else line[:117] + "..."


def _type_problems(body: Any, fields: Mapping[str, JSONKinds]) -> list[str]:
    if not isinstance(body, dict):
        return [f"the reply is {_shown(body)}, not a JSON object"]
    problems = []
    if "data" in body and "data" not in fields:
        problems.append('a top-level "data" key: replies must be bare objects')
    for name, kinds in fields.items():
        if name not in body:
            problems.append(f"{name} is missing")
            continue
        value = body[name]
        # bool is an int in Python; a JSON true where a number belongs is still wrong.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            problems.append(f"{name} is {_shown(value)}, not {wanted}")
    return problems


def _currency_problem(value: str) -> list[str]:
    return [] if len(value) == 3 and value.isalpha() else ["currency is not a 3-letter code"]


def _uses(n: int) -> str:
    return f"{n} use" if n == 1 else f"{n} uses"


class Checklist:
    def __init__(
        self, client: BillingClient, *, return_url: str | None, purchase: bool, progress: TextIO | None
    ) -> None:
        self.client = client
        self.return_url = return_url
        self.purchase = purchase
        self.progress = progress
        self.credits: Any = None
        self.payment_id: str | None = None

    async def run(self, report: Report) -> None:
        steps: list[tuple[str, Callable[[], Awaitable[tuple[Result, str]]]]] = [
            ("Get Credit Status", self.get_credit_status),
            ("Check Credit Balance Display", self.check_balance_display),
            ("Check Purchase Options", self.check_purchase_options),
            ("Initiate Purchase", self.initiate_purchase),
            ("Check Purchase Status", self.check_purchase_status),
            ("Get Transaction History", self.get_transactions),
            ("Verify Store Purchase", self.verify_store_purchase),
            ("Get Tool Balances", self.get_tool_balances),
        ]
        for name, check in steps:
            if self.progress is not None:
                print(f"... {name}", file=self.progress, flush=True)
            try:
                result, reason = await check()
            except BillingConnectionError as exc:
                result, reason = "FAIL", str(exc)
            except BillingAPIError as exc:
                result, reason = "FAIL", f"HTTP {exc.status}: {_brief(exc.detail)}"
            except BillingClientError as exc:
                result, reason = "FAIL", str(exc)
            report.steps.append(Step(name, result, reason))

    async def get_credit_status(self) -> tuple[Result, str]:
        self.credits = await self.client.request("GET", self.client.prefix + CREDITS_ROUTE, unwrap=False)
        problems = _type_problems(self.credits, CREDITS_REQUIRED_FIELDS)
        if problems:
            return "FAIL", "; ".join(problems)
        return "PASS", f"all {len(CREDITS_REQUIRED_FIELDS)} fields present with their types"

    async def check_balance_display(self) -> tuple[Result, str]:
        status = self.credits
        if _type_problems(status, CREDITS_REQUIRED_FIELDS):
            return "FAIL", "no usable credit status (see Get Credit Status)"
        total = status["credits_remaining"] + status["free_uses_remaining"]
        problems = []
        if status["credits_remaining"] < 0 or status["free_uses_remaining"] < 0:
            problems.append("a negative count")
        if status["has_credit"] and total <= 0:
            problems.append("has_credit is true but credits_remaining + free_uses_remaining is 0")
        if not status["has_credit"] and total != 0:
            problems.append(f"has_credit is false but {total} uses remain")
        if status["plan_name"] is None:
            problems.append("plan_name is null")
        if problems:
            return "FAIL", "; ".join(problems)
        if status["has_credit"]:
            return "PASS", f"shows {_uses(total)} remaining"
        return "PASS", "shows no credit left" + (f" ({status['reason']})" if status.get("reason") else "")

    async def check_purchase_options(self) -> tuple[Result, str]:
        status = self.credits
        if _type_problems(status, CREDITS_REQUIRED_FIELDS):
            return "FAIL", "no usable credit status (see Get Credit Status)"
        options = status["purchase_options"]
        if not status["purchase_required"]:
            if options is not None:
                # Allowed (docs/compatibility.md requires options only when a purchase is required; real
                # CIRIS agents send zeroed ones), and UIs ignore them.
                return "PASS", "no purchase required (options sent anyway; UIs ignore them)"
            return "PASS", "no purchase required, no options shown"
        problems = _type_problems(options, PURCHASE_OPTIONS_FIELDS)
        if problems:
            return "FAIL", "purchase_required but " + "; ".join(problems)
        if options["price_minor"] <= 0 or options["uses"] < 1 or _currency_problem(options["currency"]):
            return (
                "FAIL",
                f"implausible purchase options (price {options['price_minor']}, uses {options['uses']})",
            )
        price = f"{options['price_minor'] / 100:.2f} {options['currency']}"
        return "PASS", f"{price} for {_uses(options['uses'])}"

    async def initiate_purchase(self) -> tuple[Result, str]:
        if not self.purchase:
            return "SKIP", "--no-purchase: no PaymentIntent created"
        body = {"return_url": self.return_url} if self.return_url else {}
        try:
            reply = await self.client.request(
                "POST", self.client.prefix + INITIATE_ROUTE, json_body=body, unwrap=False
            )
        except BillingNotEnabled as exc:
            return "SKIP", f"billing not enabled for this agent (403: {_brief(exc.detail)})"
        problems = _type_problems(reply, INITIATED_FIELDS)
        if not problems:
            if not reply["publishable_key"]:
                problems.append("publishable_key is empty")
            if not reply["client_secret"]:
                problems.append("client_secret is empty")
            if reply["amount_minor"] <= 0:
                problems.append(f"amount_minor is {reply['amount_minor']}")
            if reply["uses_purchased"] < 1:
                problems.append(f"uses_purchased is {reply['uses_purchased']}")
            problems += _currency_problem(reply["currency"])
        if problems:
            return "FAIL", "; ".join(problems)
        self.payment_id = reply["payment_id"]
        price = f"{reply['amount_minor'] / 100:.2f} {reply['currency']}"
        return "PASS", f"payment {reply['payment_id']}: {price} for {_uses(reply['uses_purchased'])}"

    async def check_purchase_status(self) -> tuple[Result, str]:
        if self.payment_id is None:
            return "SKIP", "no purchase was initiated"
        path = self.client.prefix + STATUS_ROUTE + self.payment_id
        reply = await self.client.request("GET", path, unwrap=False)
        problems = _type_problems(reply, PURCHASE_STATUS_FIELDS)
        if not problems:
            problems += [
                f"{name} is negative"
                for name in ("credits_added", "balance_after")
                if isinstance(reply[name], int) and reply[name] < 0
            ]
        if problems:
            return "FAIL", "; ".join(problems)
        if reply["status"] not in PAYMENT_STATES:
            return "FAIL", f"unknown status {reply['status']!r}"
        return "PASS", f"status {reply['status']}"

    async def get_transactions(self) -> tuple[Result, str]:
        reply = await self.client.request(
            "GET",
            self.client.prefix + TRANSACTIONS_ROUTE,
            params={"limit": "50", "offset": "0"},
            unwrap=False,
        )
        problems = _type_problems(reply, TRANSACTION_PAGE_FIELDS)
        if problems:
            return "FAIL", "; ".join(problems)
        items, total = reply["transactions"], reply["total_count"]
        if len(items) > 50:
            return "FAIL", f"{len(items)} transactions for limit=50"
        if total < len(items) or reply["has_more"] != (len(items) < total):
            return "FAIL", f"{len(items)} listed, total_count {total}, has_more {_shown(reply['has_more'])}"
        for index, item in enumerate(items):
            present = {
                k: v for k, v in TRANSACTION_EXTRA_FIELDS.items() if isinstance(item, dict) and k in item
            }
            item_problems = _type_problems(item, {**TRANSACTION_FIELDS, **present})
            if not item_problems:
                if item["type"] not in TRANSACTION_TYPES:
                    wanted = " or ".join(TRANSACTION_TYPES)
                    item_problems.append(f'type is "{item["type"][:20]}", not {wanted}')
                item_problems += _currency_problem(item["currency"])
            if item_problems:
                return "FAIL", f"transaction {index}: " + "; ".join(item_problems)
        return "PASS", f"{len(items)} of {total} transactions" + (" (more)" if reply["has_more"] else "")

    async def verify_store_purchase(self) -> tuple[Result, str]:
        """The mobile apps' route, with a purchase no store issued: it must answer 200 with
        `success: false` (the apps read that, never an error status)."""
        try:
            reply = await self.client.request(
                "POST", self.client.prefix + GOOGLE_PLAY_ROUTE, json_body=MADE_UP_PURCHASE, unwrap=False
            )
        except BillingNotEnabled as exc:
            # An agent from before the stores answered 200 `success: false` when off.
            return "SKIP", f"app store purchases not enabled for this agent (403: {_brief(exc.detail)})"
        except NotFoundError:
            return "SKIP", "no google-play/verify route (404): the CIRIS mobile apps cannot buy through it"
        problems = _type_problems(reply, STORE_VERIFICATION_FIELDS)
        if problems:
            return "FAIL", "; ".join(problems)
        if not reply["success"] and "Billing not enabled" in str(reply["error"]):
            return "SKIP", f"app store purchases not enabled for this agent ({_brief(reply['error'])})"
        if reply["success"] or reply["credits_added"]:
            return "FAIL", "a made-up purchase token was accepted"
        return "PASS", f"a made-up purchase is refused with success: false ({_brief(reply['error'])})"

    async def get_tool_balances(self) -> tuple[Result, str]:
        """The tool credits (CIRIS's `/v1/api/tools`): every balance well-formed, the name rule kept."""
        tools = self.client.tools_prefix
        try:
            reply = await self.client.request("GET", f"{tools}/balance", unwrap=False)
        except NotFoundError:
            return "SKIP", f"no {tools}/balance route (404): the agent sells no tool credits"
        items = reply.get("balances")
        if not isinstance(items, list):
            return "FAIL", "balance: no balances list"
        for index, item in enumerate(items):
            problems = _type_problems(item, TOOL_BALANCE_FIELDS)
            if not problems and item["total_available"] != item["free_remaining"] + item["paid_credits"]:
                problems = ["total_available is not free_remaining + paid_credits"]
            if problems:
                return "FAIL", f"balance {index}: " + "; ".join(problems)
        try:
            await self.client.request("GET", f"{tools}/balance/9-not-a-tool", unwrap=False)
        except BillingAPIError as exc:
            if exc.status != 400:
                return "FAIL", f"a tool name breaking the rule answered HTTP {exc.status}, not 400"
        else:
            return "FAIL", "a tool name breaking the rule was answered 200, not 400"
        shown = ", ".join(f"{item['product_type']} ({_uses(item['total_available'])} left)" for item in items)
        return "PASS", shown or "no products sold per use"


async def run_qa(
    url: str,
    username: str,
    password: str,
    *,
    return_url: str | None = None,
    purchase: bool = True,
    request_timeout: float = 30.0,
    progress: TextIO | None = None,
) -> Report:
    report = Report(url=url)
    try:
        client = BillingClient(url, timeout=request_timeout)
    except ValueError as exc:
        raise QAError(str(exc)) from None
    async with client:
        if progress is not None:
            print(f"... Log in as {username}", file=progress, flush=True)
        try:
            reply = await client.request(
                "POST",
                DEFAULT_LOGIN_PATH,
                json_body={"username": username, "password": password},
                auth=False,
                unwrap=False,
            )
        except BillingConnectionError as exc:
            raise QAError(str(exc)) from None
        except BillingAPIError as exc:
            raise QAError(f"login as {username!r} failed: HTTP {exc.status}: {_brief(exc.detail)}") from None
        except BillingClientError as exc:
            raise QAError(f"login as {username!r} failed: {exc}") from None
        # QA tools read response.json()["access_token"] at the top level (docs/compatibility.md).
        token = reply.get("access_token")
        if not isinstance(token, str) or not token:
            raise QAError('the login reply has no top-level access_token (is it wrapped in "data"?)')
        client.token = token
        await Checklist(client, return_url=return_url, purchase=purchase, progress=progress).run(report)
    return report


def render_table(report: Report) -> str:
    width = max(len(step.name) for step in report.steps)
    lines = [f"Billing QA for {report.url}", ""]
    lines.append(f"{'Step':<{width}}  Result  Reason")
    lines.append(f"{'-' * width}  ------  ------")
    for step in report.steps:
        lines.append(f"{step.name:<{width}}  {step.result:<6}  {step.reason}")
    failed = sum(step.result == "FAIL" for step in report.steps)
    skipped = sum(step.result == "SKIP" for step in report.steps)
    passed = sum(step.result == "PASS" for step in report.steps)
    verdict = "FAILED" if failed else "OK"
    lines += ["", f"QA {verdict}: PASS {passed}, FAIL {failed}, SKIP {skipped}"]
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return json.dumps(
        {"url": report.url, "passed": report.passed, "steps": [asdict(step) for step in report.steps]},
        indent=2,
    )


def print_report(report: Report, *, as_json: bool, out: TextIO = sys.stdout) -> None:
    print(render_json(report) if as_json else render_table(report), file=out)
