"""Regenerate the README's pictures of `<ciris-billing>`: `python -m tests.screenshots [DIR]`.

Runs the demo (`serve --fake-backend`, and `serve` with the `simple` provider), drives the element
through its main states in Chromium and saves one PNG per state into DIR (default docs/images), and
two at a phone's width (paying, and succeeded with the history).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Final

from .ui_driver import CHROMIUM, DemoPage, demo_server, missing_browser

ROOT = Path(__file__).resolve().parents[1]
FREE_USES = 12
DESKTOP: Final = {"width": 640, "height": 900}
PHONE: Final = {"width": 390, "height": 900}


def shoot(demo: DemoPage, out: Path, name: str) -> Path:
    path = out / f"billing-{name}.png"
    demo.element.screenshot(path=str(path), animations="disabled")
    return path


def shoot_phone(demo: DemoPage, out: Path, name: str) -> Path:
    """The element as a 390 px wide phone shows it (the narrow layout), then back to the desktop."""
    demo.page.set_viewport_size(PHONE)
    try:
        return shoot(demo, out, name)
    finally:
        demo.page.set_viewport_size(DESKTOP)


def main(argv: list[str]) -> int:
    reason = missing_browser()
    if reason is not None:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    out = Path(argv[0]) if argv else ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        context = browser.new_context(viewport=DESKTOP, device_scale_factor=2)
        context.set_default_timeout(15_000)
        page = context.new_page()
        with demo_server(Path(tmp) / "paid", "--fake-backend") as paid:
            demo = DemoPage(page, paid.url)
            demo.login("ann")
            demo.wait_for_state("ready")
            saved.append(shoot(demo, out, "ready"))
            demo.spend(FREE_USES)
            page.evaluate("document.querySelector('ciris-billing').refresh()")
            demo.wait_for_state("no-credit")
            saved.append(shoot(demo, out, "no-credit"))
            demo.start_purchase()
            demo.fill_card("4000 0000 0000 0002")
            saved.append(shoot(demo, out, "paying"))
            saved.append(shoot_phone(demo, out, "phone-paying"))
            demo.part("pay").click()
            demo.wait_for_state("failed")
            saved.append(shoot(demo, out, "failed"))
            page.get_by_role("button", name="Try again").click()
            demo.wait_for_state("paying")
            demo.fill_card("4242 4242 4242 4242")
            demo.part("pay").click()
            demo.wait_for_state("processing")
            saved.append(shoot(demo, out, "processing"))
            demo.wait_for_state("succeeded")
            demo.part("history").locator("tbody tr[data-type=credit]").wait_for()
            saved.append(shoot(demo, out, "succeeded"))
            saved.append(shoot_phone(demo, out, "phone"))
        with demo_server(Path(tmp) / "free", "--provider-option", "free_uses=3") as free:
            demo = DemoPage(page, free.url)
            demo.login("ann")
            demo.wait_for_state("disabled")
            demo.spend(1)
            page.evaluate("document.querySelector('ciris-billing').refresh()")
            demo.element.locator("tbody tr").first.wait_for()
            saved.append(shoot(demo, out, "disabled"))
        browser.close()
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
