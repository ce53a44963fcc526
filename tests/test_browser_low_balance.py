"""The low-balance notice of `<ciris-billing>` in Chromium, against a real `serve` whose
`CIRIS_BILLING_LOW_BALANCE_THRESHOLD` reaches the element through `/capabilities`: shown at or under
the threshold, gone at zero (the status says that), announced, and no wider than a phone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .serving import Server, clean_env, serve
from .test_browser import FITS, WIDTHS, browser, page  # noqa: F401 (fixtures)
from .ui_driver import ELEMENT, SECRET, DemoPage, user_args


@pytest.fixture(scope="module")
def low(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Server]:  # noqa: F811
    env = clean_env(CIRIS_JWT_SECRET=SECRET, CIRIS_BILLING_LOW_BALANCE_THRESHOLD="2")
    args = [*user_args(), "--provider-option", "free_uses=5"]
    with serve(args, tmp_path_factory.mktemp("low"), env) as server:
        yield server


def notice(demo: DemoPage) -> Any:
    return demo.part("low-balance")


def test_the_notice_shows_at_the_threshold_and_fits_a_phone(
    page: Any,  # noqa: F811
    low: Server,
    tmp_path: Path,
) -> None:
    demo = DemoPage(page, low.url)
    demo.login("ann")
    demo.wait_for_state("disabled")
    assert demo.total() == 5
    assert not notice(demo).is_visible()
    demo.spend(3)
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    notice(demo).wait_for(state="visible")
    assert demo.total() == 2
    assert notice(demo).inner_text() == "Running low: 2 uses left."  # nothing to buy here
    assert notice(demo).get_attribute("role") == "status"
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        result = page.evaluate(FITS)
        assert result["page"] <= result["viewport"], (width, result)
        assert result["wide"] == [], (width, result)
        box = notice(demo).bounding_box()
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= width
        demo.element.screenshot(path=str(tmp_path / f"low-balance-{width}.png"), animations="disabled")
    demo.spend(1)
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    page.wait_for_function(
        f"document.querySelector('{ELEMENT}').shadowRoot.textContent.includes('Running low: 1 use left.')"
    )
    demo.spend(1)
    page.evaluate(f"document.querySelector('{ELEMENT}').refresh()")
    notice(demo).wait_for(state="hidden")  # none left: the status line says so instead
    assert demo.total() == 0
    assert "no uses left" in demo.status_text()


def test_where_credits_are_sold_the_notice_says_to_buy_more(
    page: Any,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    env = clean_env(CIRIS_JWT_SECRET=SECRET, CIRIS_BILLING_LOW_BALANCE_THRESHOLD="12")
    with serve([*user_args(), "--fake-backend"], tmp_path_factory.mktemp("paid-low"), env) as server:
        demo = DemoPage(page, server.url)
        demo.login("ben")
        demo.wait_for_state("ready")
        notice(demo).wait_for(state="visible")
        assert notice(demo).inner_text() == "Running low: 12 uses left. Buy more to keep going."
        assert demo.part("buy").is_visible()
        page.set_viewport_size({"width": 320, "height": 900})
        result = page.evaluate(FITS)
        assert result["page"] <= result["viewport"], result
        assert result["wide"] == [], result
        demo.element.screenshot(path=str(tmp_path / "low-balance-paid-320.png"), animations="disabled")
