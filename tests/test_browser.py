"""The billing UI kit in a real browser: the demo page and `<ciris-billing>` in Chromium, against real
`serve` processes (the paid flow with `--fake-backend`, the `simple` provider, and `ciris` against a
billing backend of its own), at phone and desktop widths, and from shop pages on other ports."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from ciris_billing_proxy.tools.demo import INTERACT_PATH

from .repo_files import README
from .serving import Server, clean_env, serve
from .ui_driver import ELEMENT, REQUIRED, SECRET, DemoPage, demo_server, missing_browser, user_args

STATES = ("loading", "ready", "no-credit", "disabled", "paying", "processing", "succeeded", "failed", "error")

FREE_USES = 12  # the fake backend's 10 one-time and 2 daily free uses


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = missing_browser()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"browser tests are required here (CIRIS_BROWSER_TESTS=required): {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from .ui_driver import CHROMIUM

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def paid(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Server]:
    with demo_server(tmp_path_factory.mktemp("paid"), "--fake-backend") as server:
        yield server


@pytest.fixture(scope="module")
def free(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Server]:
    with demo_server(tmp_path_factory.mktemp("free"), "--provider-option", "free_uses=3") as server:
        yield server


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 800, "height": 1000})
    context.set_default_timeout(15_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == [], errors


def test_login_shows_the_free_uses(page: Any, paid: Server) -> None:
    demo = DemoPage(page, paid.url)
    demo.login("ann")
    demo.wait_for_state("ready")
    assert demo.total() == FREE_USES
    assert "12 free (2 of them daily)" in demo.part("balance").inner_text()
    assert demo.part("buy").is_visible()
    assert demo.part("status").get_attribute("aria-live") == "polite"
    assert "You have 12 uses left." in demo.status_text()


def test_a_wrong_password_is_said_on_the_page(page: Any, paid: Server) -> None:
    demo = DemoPage(page, paid.url)
    demo.login("ann", "not-the-password")
    page.get_by_text("Invalid credentials").wait_for()
    assert page.locator(ELEMENT).count() == 0


def test_use_up_the_free_uses_then_buy_with_the_test_card(page: Any, paid: Server) -> None:
    demo = DemoPage(page, paid.url)
    demo.login("ben")
    demo.wait_for_state("ready")
    demo.spend(FREE_USES - 1)
    page.click("#interact")  # the last free use, from the page; it refreshes the element
    page.get_by_text("You said: hello").wait_for()
    demo.wait_for_state("no-credit")
    assert page.locator("#interact").is_disabled()  # no uses left: nothing to try
    refused = page.request.post(paid.url + INTERACT_PATH, headers={"Authorization": f"Bearer {demo.token()}"})
    assert refused.status == 402  # the gate agrees
    assert demo.total() == 0
    assert demo.part("buy").inner_text() == "Buy 20 uses for $5.00"
    assert "Buy 20 uses for $5.00 to continue" in demo.status_text()

    demo.part("buy").focus()  # keyboard only from here: Enter on the button, Enter in the form
    page.keyboard.press("Enter")
    demo.wait_for_state("paying")
    assert demo.part("pay").inner_text() == "Pay $5.00"
    assert demo.status_text() == "Enter your card details."
    page.locator("input[name=cardnumber]").focus()
    page.keyboard.type("4242424242424242")
    page.keyboard.type("1234")  # focus moves on by itself, as in Stripe's card element
    page.keyboard.type("123")
    assert demo.status_text() == "Card details complete: press Pay $5.00 to finish."
    page.keyboard.press("Tab")
    assert page.evaluate(f"document.querySelector('{ELEMENT}').shadowRoot.activeElement.part.value") == "pay"
    page.keyboard.press("Enter")
    demo.wait_for_state("succeeded")

    focused = f"document.querySelector('{ELEMENT}').shadowRoot.activeElement?.textContent"
    assert page.evaluate(focused) == "Done"  # keyboard users land on the next action
    seen = demo.seen()
    states = seen["states"]
    assert states.index("paying") < states.index("processing") < states.index("succeeded")
    assert len(set(seen["processingHeights"])) <= 1, seen["processingHeights"]  # no layout shift
    assert "Payment complete: 20 uses added." in demo.status_text()
    assert page.locator("#reply").inner_text() == ""  # what the page said before is old news
    assert not page.locator("#interact").is_disabled()
    assert demo.total() == 20
    assert "20 paid" in demo.part("balance").inner_text()
    first = demo.part("history").locator("tbody tr").first
    assert first.get_attribute("data-type") == "credit"
    assert "+20" in first.inner_text()
    [event] = [e for e in seen["events"] if e["name"] == "purchase-succeeded"]
    assert event["detail"] == {"status": "succeeded", "credits_added": 20, "balance_after": 20}
    history = demo.part("history")
    assert "1\u20135 of 13" in history.inner_text()  # 12 uses and the purchase, five a page
    history.get_by_role("button", name="Older →").click()
    history.get_by_text("6\u201310 of 13").wait_for()
    assert history.locator("tbody tr[data-type=charge]").count() == 5
    demo.part("status").get_by_text("Payment complete").wait_for()  # paging leaves the result alone
    page.get_by_role("button", name="Done").focus()
    page.keyboard.press("Enter")  # focus is on "Done"
    demo.wait_for_state("ready")


@pytest.mark.parametrize(
    ("user", "card", "message", "decline"),
    [
        ("cat", "4000 0000 0000 0002", "Your card was declined.", "generic_decline"),
        ("dan", "4000 0000 0000 9995", "Your card has insufficient funds.", "insufficient_funds"),
    ],
)
def test_a_refused_card_fails_with_a_readable_message(
    page: Any, paid: Server, user: str, card: str, message: str, decline: str
) -> None:
    demo = DemoPage(page, paid.url)
    demo.login(user)
    demo.wait_for_state("ready")
    demo.start_purchase()
    demo.fill_card(card)
    demo.part("pay").click()
    demo.wait_for_state("failed")
    assert message in demo.status_text()
    assert demo.total() == FREE_USES  # nothing bought, nothing spent
    [event] = [e for e in demo.seen()["events"] if e["name"] == "purchase-failed"]
    assert event["detail"]["code"] == "card_declined"
    assert event["detail"]["message"].startswith(message)
    assert "processing" not in demo.seen()["states"]

    page.get_by_role("button", name="Try again").click()  # the same purchase, another card
    demo.wait_for_state("paying")
    demo.fill_card("4242 4242 4242 4242")
    demo.part("pay").click()
    demo.wait_for_state("succeeded")
    assert demo.total() == FREE_USES + 20


def test_an_incomplete_card_is_checked_before_anything_is_sent(page: Any, paid: Server) -> None:
    demo = DemoPage(page, paid.url)
    demo.login("eve")
    demo.wait_for_state("ready")
    demo.start_purchase()
    demo.fill_card("4242 4242", expiry="", cvc="")
    demo.part("pay").click()
    page.get_by_text("Your card number is incomplete.").wait_for()
    assert demo.state() == "paying"
    page.get_by_role("button", name="Cancel").click()
    demo.wait_for_state("ready")


def test_simple_provider_is_disabled_without_a_buy_button(page: Any, free: Server) -> None:
    demo = DemoPage(page, free.url)
    demo.login("ann")
    demo.wait_for_state("disabled")
    assert demo.total() == 3
    assert not demo.part("buy").is_visible()
    assert "paid" not in demo.part("balance").inner_text()  # nothing can be bought here
    demo.spend(2)
    page.click("#interact")  # the last use; the page refreshes the element
    page.wait_for_function(
        f"document.querySelector('{ELEMENT}').shadowRoot.textContent.includes('no uses left')"
    )
    assert demo.state() == "disabled"
    assert demo.total() == 0
    assert not demo.part("buy").is_visible()
    assert page.locator("#interact").is_disabled()


def test_an_expired_token_raises_the_unauthorized_event(page: Any, free: Server) -> None:
    demo = DemoPage(page, free.url)
    demo.login("ben")
    demo.wait_for_state("disabled")
    expired = jwt.encode({"sub": "ben", "exp": 1_000_000_000}, SECRET, algorithm="HS256")
    page.evaluate(f"document.querySelector('{ELEMENT}').token = {expired!r}")
    page.wait_for_function("window.seen.events.some((e) => e.name === 'unauthorized')")
    [event] = [e for e in demo.seen()["events"] if e["name"] == "unauthorized"]
    assert event["detail"] == {"status": 401, "detail": "Token expired"}
    # The demo page signs the user out on the event.
    page.get_by_text("Your session has ended. Please sign in again.").wait_for()
    assert page.locator("input[name=username]").is_visible()


def test_a_503_is_retried_with_a_visible_message(page: Any, paid: Server) -> None:
    failures = {"left": 2}

    def flaky(route: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            route.fulfill(status=503, json={"detail": "Billing service unavailable"})
        else:
            route.continue_()

    page.route("**/v1/api/billing/credits", flaky)
    demo = DemoPage(page, paid.url)
    demo.login("fay")
    demo.wait_for_state("error")
    assert "temporarily unavailable" in demo.status_text()
    assert "Trying again in" in demo.status_text()
    demo.wait_for_state("ready", timeout=20_000)
    assert failures["left"] == 0
    # The user asked for no "Try now", twice: focus never moved into the element.
    assert ELEMENT not in demo.seen()["focused"]
    assert demo.total() == FREE_USES


def test_the_readme_three_lines_sell_credits(page: Any, paid: Server) -> None:
    snippet = re.search(r"<!-- readme-test: ui-snippet -->\n```html\n(.*?)```", README, re.S)
    assert snippet is not None
    token = jwt.encode({"sub": "gus", "email": "gus@example.com", "exp": 4_000_000_000}, SECRET)
    html = f"<!doctype html><body>{snippet.group(1).replace('ACCESS_TOKEN', repr(token))}</body>"
    # The page is the snippet, served at the agent's origin; the script and the API are the agent's.
    page.route(f"{paid.url}/shop.html", lambda route: route.fulfill(body=html, content_type="text/html"))
    page.goto(f"{paid.url}/shop.html")
    demo = DemoPage(page, paid.url)
    demo.wait_for_state("ready")
    assert demo.total() == FREE_USES
    scripts: list[str] = []
    page.on("request", lambda request: scripts.append(request.url) if "stripe" in request.url else None)
    demo.start_purchase()  # no stripe-js attribute: the agent names its fake Stripe in /capabilities
    assert scripts == [f"{paid.url}/_fake_stripe/stripe.js"]
    demo.fill_card("4242 4242 4242 4242")
    demo.part("pay").click()
    demo.wait_for_state("succeeded")
    assert demo.total() == FREE_USES + 20


def test_the_js_client_throws_typed_errors(page: Any, free: Server) -> None:
    page.goto(free.url)
    token = jwt.encode({"sub": "hal", "exp": 4_000_000_000}, SECRET)
    result = page.evaluate(
        """async (token) => {
          const kit = await import('/v1/api/billing/ui/billing.js');
          const caught = async (call) => {
            try { await call(); return null; } catch (e) {
              return { name: e.name, status: e.status ?? null, detail: e.detail ?? null,
                       typed: e instanceof kit.BillingClientError };
            }
          };
          const anonymous = new kit.BillingClient();
          const signedIn = new kit.BillingClient({ token: async () => token });
          const nowhere = new kit.BillingClient({ apiBase: 'http://127.0.0.1:9' });
          return {
            credits: await signedIn.getCredits(),
            capabilities: await signedIn.getCapabilities(),
            unauthorized: await caught(() => anonymous.getCredits()),
            notEnabled: await caught(() => signedIn.initiatePurchase()),
            polling: await caught(() => signedIn.waitForPurchase('pi_missing', { intervalMs: 10 })),
            badPage: await caught(() => signedIn.getTransactions({ limit: 1000 })),
            unreachable: await caught(() => nowhere.getCredits()),
          };
        }""",
        token,
    )
    assert result["credits"]["free_uses_remaining"] == 3
    assert result["capabilities"] == {
        "provider": "simple",
        "purchases": False,
        "transactions": True,
        "google_play": False,
        "apple_storekit": False,
        "charges": True,
        "products": ["web_search"],
    }
    assert result["unauthorized"] == {
        "name": "AuthenticationError",
        "status": 401,
        "detail": "Not authenticated",
        "typed": True,
    }
    assert result["notEnabled"]["name"] == "BillingNotEnabled"
    assert result["notEnabled"]["status"] == 403
    assert result["polling"]["name"] == "BillingNotEnabled"  # not a passing fault: thrown at once
    assert result["badPage"]["name"] == "InvalidRequestError"
    assert result["badPage"]["status"] == 422
    assert result["unreachable"]["name"] == "BillingConnectionError"


def test_tool_credits_in_the_js_client_and_the_product_attribute(page: Any, free: Server) -> None:
    """The demo sells `web_search` per use (10 free): the JS client reads and gates it, and
    `<ciris-billing product="web_search">` shows that product's uses instead of the credits."""
    page.goto(free.url)
    token = jwt.encode({"sub": "ivy", "exp": 4_000_000_000}, SECRET)
    result = page.evaluate(
        """async (token) => {
          const kit = await import('/v1/api/billing/ui/billing.js');
          const client = new kit.BillingClient({ token });
          const used = await fetch('/v1/agent/tools/web_search', {
            method: 'POST', headers: { Authorization: `Bearer ${token}` } });
          let missing = null;
          try { await client.getToolBalance('image_gen'); } catch (e) { missing = e.name; }
          const element = document.createElement('ciris-billing');
          element.setAttribute('product', 'web_search');
          element.token = token;
          document.body.append(element);
          for (let i = 0; i < 100 && element.state !== 'ready'; i += 1) {
            await new Promise((r) => setTimeout(r, 50));
          }
          return {
            used: used.status,
            balance: await client.getToolBalance('web_search'),
            all: await client.getToolBalances(),
            check: await client.checkTool('web_search'),
            available: await client.getAvailableTools(),
            purchase: await client.purchaseTool(
              { productId: 'web_search_10', purchaseToken: 'gp-0123456789', toolName: 'web_search' }),
            missing,
            shown: element.shadowRoot.querySelector('.number').textContent,
            buyHidden: element.shadowRoot.querySelector('.buy').hidden,
          };
        }""",
        token,
    )
    assert result["used"] == 200
    assert (result["balance"]["free_remaining"], result["balance"]["total_uses"]) == (9, 1)
    assert [b["product_type"] for b in result["all"]["balances"]] == ["web_search"]
    assert result["check"]["has_credit"] is True
    assert result["available"]["tools"][0]["name"] == "web_search"
    assert (result["purchase"]["success"], result["purchase"]["message"]) == (
        False,
        "Billing not enabled for this agent",
    )
    assert result["missing"] == "NotFoundError"
    assert result["shown"] == "9"
    assert result["buyHidden"] is True


def test_a_403_on_buying_hides_the_buy_button(page: Any, free: Server) -> None:
    # An agent whose capabilities claim purchases while its purchase route says "Billing not enabled".
    page.route(
        "**/v1/api/billing/capabilities",
        lambda route: route.fulfill(json={"provider": "simple", "purchases": True, "transactions": True}),
    )
    demo = DemoPage(page, free.url)
    demo.login("cat")
    demo.wait_for_state("ready")
    demo.part("buy").click()
    demo.wait_for_state("disabled")
    assert not demo.part("buy").is_visible()
    assert demo.total() == 3


def test_the_history_of_a_provider_of_its_own_claims_no_pool(page: Any, free: Server) -> None:
    # Whether its `balance_after` counts paid credits or every use, the element cannot tell.
    page.route(
        "**/v1/api/billing/capabilities",
        lambda route: route.fulfill(json={"provider": "acme", "purchases": True, "transactions": True}),
    )
    demo = DemoPage(page, free.url)
    demo.login("dan")
    demo.wait_for_state("ready")
    demo.spend(1)
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    row = demo.part("history").locator("tbody tr").first
    row.wait_for()
    assert demo.part("history").locator("th.balance").inner_text() == "Balance after"
    assert row.locator("td.balance").inner_text() == "2"


# -- every screen: no sideways scrolling from 320 px up, in every state --------------------------------

WIDTHS = (320, 390, 1280)
#: The page's width, and every box of the element (its shadow tree and the slotted card form) that
#: sticks out of the viewport.
FITS = """() => {
  const element = document.querySelector('ciris-billing');
  const nodes = [element, ...element.shadowRoot.querySelectorAll('*'), ...element.querySelectorAll('*')];
  const wide = nodes.filter((node) => {
    const box = node.getBoundingClientRect();
    return box.width > 0 && (box.width > innerWidth || box.left < -0.5 || box.right > innerWidth + 0.5);
  }).map((node) => `${node.localName}.${node.getAttribute('class') || node.getAttribute('name') || ''}`);
  return { page: document.documentElement.scrollWidth, viewport: innerWidth, wide };
}"""


def assert_fits(page: Any, state: str, checked: set[str]) -> None:
    assert page.locator(ELEMENT).get_attribute("state") == state
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        result = page.evaluate(FITS)
        assert result["page"] <= result["viewport"], (state, width, result)
        assert result["wide"] == [], (state, width, result)
    checked.add(state)


def test_every_state_fits_a_phone_and_a_desktop(page: Any, paid: Server, free: Server) -> None:
    checked: set[str] = set()
    credits = "**/v1/api/billing/credits"
    page.route(credits, lambda _route: None)  # the balance does not come until unrouted
    demo = DemoPage(page, paid.url)
    demo.login("ivy")
    demo.wait_for_state("loading")
    assert_fits(page, "loading", checked)
    page.unroute(credits)  # the held request goes on to the agent
    demo.wait_for_state("ready")
    assert_fits(page, "ready", checked)

    page.route(
        credits, lambda route: route.fulfill(status=503, json={"detail": "Billing service unavailable"})
    )
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    demo.wait_for_state("error")
    assert_fits(page, "error", checked)
    page.unroute(credits)
    page.get_by_role("button", name="Try now").click()
    demo.wait_for_state("ready")

    demo.spend(FREE_USES)
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    demo.wait_for_state("no-credit")
    assert_fits(page, "no-credit", checked)
    demo.start_purchase()
    demo.fill_card("4000 0000 0000 0002")
    assert_fits(page, "paying", checked)
    demo.part("pay").click()
    demo.wait_for_state("failed")
    assert_fits(page, "failed", checked)

    status = "**/v1/api/billing/purchase/status/*"
    pending = {"status": "processing", "credits_added": 0, "balance_after": 0}
    page.route(status, lambda route: route.fulfill(json=pending))  # held in processing
    page.get_by_role("button", name="Try again").click()
    demo.wait_for_state("paying")
    demo.fill_card("4242 4242 4242 4242")
    demo.part("pay").click()
    demo.wait_for_state("processing")
    assert_fits(page, "processing", checked)
    page.unroute(status)
    demo.wait_for_state("succeeded", timeout=30_000)
    demo.part("history").locator("tbody tr[data-type=credit]").wait_for()
    assert demo.part("history").locator("th.balance").inner_text() == "Paid left"
    assert_fits(page, "succeeded", checked)

    demo = DemoPage(page, free.url)
    demo.login("ivy")
    demo.wait_for_state("disabled")
    demo.spend(1)
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    demo.part("history").locator("tbody tr").first.wait_for()
    assert demo.part("history").locator("th.balance").inner_text() == "Uses left"
    assert_fits(page, "disabled", checked)
    assert checked == set(STATES)


# -- pages on other origins ----------------------------------------------------------------------------

#: A shop on its own origin: the element from the agent, pointed at it with `api-base`.
SHOP_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Shop</title></head><body><main>
<script type="module">
  const params = new URLSearchParams(location.search);
  const agent = params.get("agent");
  await import(`${agent}/v1/api/billing/ui/billing.js`);
  const billing = document.createElement("ciris-billing");
  billing.setAttribute("api-base", params.get("api") || agent);
  billing.token = params.get("token");
  document.querySelector("main").append(billing);
</script></main></body></html>"""


@contextmanager
def shop_server() -> Iterator[str]:
    """A real HTTP server on a port of its own serving `SHOP_PAGE`; yields its origin."""
    body = SHOP_PAGE.encode()

    class Shop(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def shops(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[tuple[str, str, Server]]:
    """An allowed shop, a shop on another origin, and an agent allowing only the first."""
    with shop_server() as allowed, shop_server() as other:
        data_dir = tmp_path_factory.mktemp("cross")
        with demo_server(data_dir, "--fake-backend", "--cors-origin", allowed) as agent:
            yield allowed, other, agent


def open_shop(page: Any, shop: str, agent: Server, user: str) -> DemoPage:
    token = jwt.encode({"sub": user, "email": f"{user}@example.com", "exp": 4_000_000_000}, SECRET)
    page.goto(f"{shop}/?{urlencode({'agent': agent.url, 'token': token})}")
    return DemoPage(page, agent.url)


def test_a_page_on_an_allowed_origin_sells_credits(page: Any, shops: tuple[str, str, Server]) -> None:
    allowed, _other, agent = shops
    demo = open_shop(page, allowed, agent, "jay")
    demo.wait_for_state("ready")
    assert demo.total() == FREE_USES
    demo.start_purchase()  # the agent's fake Stripe, named in its capabilities
    demo.fill_card("4242 4242 4242 4242")
    demo.part("pay").click()
    demo.wait_for_state("succeeded")
    assert demo.total() == FREE_USES + 20
    demo.part("history").locator("tbody tr[data-type=credit]").wait_for()


def test_a_page_on_another_origin_is_told_so_not_to_wait(page: Any, shops: tuple[str, str, Server]) -> None:
    _allowed, other, agent = shops
    demo = open_shop(page, other, agent, "kim")
    demo.wait_for_state("error")
    text = demo.status_text()
    assert f"The agent does not allow this page's origin ({other})" in text
    assert "cors_origins" in text
    assert "temporarily unavailable" not in text
    assert "Trying again" not in text
    assert demo.part("status").get_attribute("class") == "status"  # no spinner: nothing is retried
    assert page.get_by_role("button", name="Try again").is_visible()


def test_an_agent_that_is_down_is_still_an_outage(page: Any, shops: tuple[str, str, Server]) -> None:
    allowed, _other, agent = shops
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{unused.getsockname()[1]}"
    token = jwt.encode({"sub": "lee", "exp": 4_000_000_000}, SECRET)
    page.goto(f"{allowed}/?{urlencode({'agent': agent.url, 'api': down, 'token': token})}")
    demo = DemoPage(page, agent.url)
    demo.wait_for_state("error")
    assert "temporarily unavailable" in demo.status_text()
    assert "origin" not in demo.status_text()


# -- Stripe.js: the fake only where the agent runs the fake backend -----------------------------------

STRIPE_STUB = """window.Stripe = () => ({ elements: () => ({ create: () => ({
  mount() {}, on() {}, focus() {}, destroy() {} }) }) });"""


def test_a_real_deployment_loads_stripe_and_never_the_fake(
    page: Any, tmp_path_factory: pytest.TempPathFactory, browser: Any
) -> None:
    from ciris_billing_proxy.testing import FakeBillingBackend

    # The shape of a real deployment: the ciris provider against a billing backend of its own.
    with FakeBillingBackend().run_in_thread() as backend:
        env = clean_env(
            CIRIS_JWT_SECRET=SECRET, CIRIS_BILLING_API_URL=backend.url, CIRIS_BILLING_API_KEY=backend.api_key
        )
        with serve([*user_args(), "--provider", "ciris"], tmp_path_factory.mktemp("real"), env) as agent:
            loaded: list[str] = []
            page.on(
                "request", lambda request: loaded.append(request.url) if "stripe" in request.url else None
            )
            # Stripe's own script never leaves the machine: the browser gets a stand-in here.
            page.route("https://js.stripe.com/**", lambda route: route.fulfill(body=STRIPE_STUB))
            demo = DemoPage(page, agent.url)
            demo.login("lee")
            demo.wait_for_state("ready")
            assert "stripe_js" not in page.evaluate(f"document.querySelector('{ELEMENT}').capabilities")
            demo.start_purchase()
            assert loaded == ["https://js.stripe.com/v3/"]
