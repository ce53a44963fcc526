"""The paid flow in Chromium against `serve --provider stripe --fake-stripe`: the element offers the packs,
the fake Stripe.js pays through the fake Stripe API, and its signed webhook credits the agent;
`4242 4242 4242 4242` succeeds, `4000 0000 0000 0002` is declined."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .serving import Server, clean_env, serve
from .ui_driver import CHROMIUM, REQUIRED, SECRET, DemoPage, missing_browser, user_args

PACKS = [
    {"id": "small", "uses": 20, "price_minor": 500, "currency": "usd"},
    {"id": "big", "uses": 100, "price_minor": 2000, "currency": "usd"},
]
FREE_USES = 2


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = missing_browser()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"browser tests are required here (CIRIS_BROWSER_TESTS=required): {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Server]:
    env = clean_env(
        CIRIS_JWT_SECRET=SECRET, CIRIS_STRIPE_PACKS=json.dumps(PACKS), CIRIS_STRIPE_FREE_USES=str(FREE_USES)
    )
    with serve(
        [*user_args(), "--provider", "stripe", "--fake-stripe"], tmp_path_factory.mktemp("shop"), env
    ) as s:
        yield s


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


def test_the_user_chooses_a_pack_a_declined_card_fails_and_4242_pays(
    page: Any, shop: Server, tmp_path: Path
) -> None:
    demo = DemoPage(page, shop.url)
    demo.login("ann")
    demo.wait_for_state("ready")
    assert demo.total() == FREE_USES
    packs = demo.part("packs")
    assert packs.is_visible()
    assert packs.locator("option").all_inner_texts() == ["20 uses for $5.00", "100 uses for $20.00"]
    assert demo.part("buy").inner_text() == "Buy 20 uses for $5.00"
    packs.select_option("big")
    assert demo.part("buy").inner_text() == "Buy 100 uses for $20.00"
    demo.element.screenshot(path=str(tmp_path / "stripe-packs.png"))
    demo.start_purchase()
    assert demo.part("pay").inner_text() == "Pay $20.00"
    assert not packs.is_visible()  # chosen: the form is for that pack
    demo.element.screenshot(path=str(tmp_path / "stripe-paying.png"))

    demo.fill_card("4000 0000 0000 0002")
    demo.part("pay").click()
    demo.wait_for_state("failed")
    assert "Your card was declined." in demo.status_text()
    assert demo.total() == FREE_USES

    page.get_by_role("button", name="Try again").click()  # the same purchase, another card
    demo.wait_for_state("paying")
    demo.fill_card("4242 4242 4242 4242")
    demo.part("pay").click()
    demo.wait_for_state("succeeded", timeout=30_000)
    assert "Payment complete: 100 uses added." in demo.status_text()
    assert demo.total() == FREE_USES + 100
    assert "100 paid" in demo.part("balance").inner_text()
    first = demo.part("history").locator("tbody tr").first
    assert first.get_attribute("data-type") == "credit"
    assert "+100" in first.inner_text()
    # The ledger's balance after each line counts free and paid uses, as the big number does.
    assert demo.part("history").locator("th.balance").inner_text() == "Uses left"
    assert first.locator("td.balance").inner_text() == str(FREE_USES + 100)
    assert first.locator("td.balance").get_attribute("data-label") == "Uses left: "
    demo.element.screenshot(path=str(tmp_path / "stripe-succeeded.png"))
    # The signed webhook credits it (or the poll, whichever comes first): once either way.
    page.wait_for_timeout(1500)  # past the fake's webhook delay: the late delivery changes nothing
    page.get_by_role("button", name="Done").click()
    demo.wait_for_state("ready")
    page.evaluate("document.querySelector('ciris-billing').refresh()")
    page.wait_for_timeout(300)
    assert demo.total() == FREE_USES + 100


def test_the_default_pack_when_credit_runs_out(page: Any, shop: Server) -> None:
    demo = DemoPage(page, shop.url)
    demo.login("ben")
    demo.wait_for_state("ready")
    demo.spend(FREE_USES)
    page.evaluate("document.querySelector('ciris-billing').refresh()")
    demo.wait_for_state("no-credit")
    assert "Buy 20 uses for $5.00 to continue" in demo.status_text()
    demo.start_purchase()
    demo.fill_card("4242 4242 4242 4242")
    demo.part("pay").click()
    demo.wait_for_state("succeeded", timeout=30_000)
    assert demo.total() == 20
