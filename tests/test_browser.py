"""The billing UI kit in a real browser: the demo page and `<ciris-billing>` in Chromium, against real
`serve` processes (the paid flow with `--fake-backend`, and the `simple` provider)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from .repo_files import README
from .serving import Server
from .ui_driver import ELEMENT, REQUIRED, SECRET, DemoPage, demo_server, missing_browser

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
    page.click("#interact")
    page.get_by_text("No: ").wait_for()  # the gate's 402
    demo.wait_for_state("no-credit")
    assert demo.total() == 0
    assert demo.part("buy").inner_text() == "Buy 20 uses for $5.00"
    assert "Buy 20 uses for $5.00 to continue" in demo.status_text()

    demo.part("buy").focus()  # keyboard only from here: Enter on the button, Enter in the form
    page.keyboard.press("Enter")
    demo.wait_for_state("paying")
    assert demo.part("pay").inner_text() == "Pay $5.00"
    page.locator("input[name=cardnumber]").focus()
    page.keyboard.type("4242424242424242")
    page.keyboard.type("1234")  # focus moves on by itself, as in Stripe's card element
    page.keyboard.type("123")
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
    demo.spend(3)
    page.click("#interact")
    page.get_by_text("No: ").wait_for()
    page.wait_for_function(
        f"document.querySelector('{ELEMENT}').shadowRoot.textContent.includes('no uses left')"
    )
    assert demo.state() == "disabled"
    assert demo.total() == 0
    assert not demo.part("buy").is_visible()


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
    page.evaluate(
        "document.querySelector('ciris-billing').setAttribute('stripe-js', '/_fake_stripe/stripe.js')"
    )
    demo.start_purchase()
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
