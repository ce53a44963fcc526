"""Drive the demo page and its `<ciris-billing>` in Chromium (Playwright): shared by the browser tests
and by `python -m tests.screenshots`.

Playwright is launched on the system's Chromium (`/usr/bin/chromium`, or `CIRIS_CHROMIUM`): its own
browser download is not used. Browser tests skip when that Chromium is missing, unless
`CIRIS_BROWSER_TESTS=required` (set by `.ci/run`), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciris_billing_proxy.tools.demo import INTERACT_PATH

from .serving import Server, clean_env, serve

CHROMIUM = Path(os.environ.get("CIRIS_CHROMIUM", "/usr/bin/chromium"))
REQUIRED = os.environ.get("CIRIS_BROWSER_TESTS", "") == "required"
SECRET = "browser-test-secret-" + "b" * 40
PASSWORD = "browser-password-1"
ELEMENT = "ciris-billing"
#: Users of the paid demo; each test takes its own, so tests never share a balance.
USERS = ("ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jay", "kim", "lee")


def missing_browser() -> str | None:
    """Why browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CIRIS_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def user_args() -> list[str]:
    return [arg for name in USERS for arg in ("--user", f"{name}:{PASSWORD}:{name}@example.com")]


@contextmanager
def demo_server(data_dir: Path, *args: str) -> Iterator[Server]:
    """`ciris-billing-proxy serve` with the browser users and a known JWT secret."""
    with serve([*user_args(), *args], data_dir, clean_env(CIRIS_JWT_SECRET=SECRET)) as server:
        yield server


@dataclass
class DemoPage:
    page: Any  # playwright.sync_api.Page
    url: str

    @property
    def element(self) -> Any:
        return self.page.locator(ELEMENT)

    def part(self, name: str) -> Any:
        return self.page.locator(f"{ELEMENT} [part={name}]")

    def login(self, username: str, password: str = PASSWORD) -> None:
        """Sign in on the demo page, recording what the element does from then on (`seen`)."""
        self.page.goto(self.url)
        self.record()
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")

    def record(self) -> None:
        """Keep every state the element passes through, its size while processing, its events and
        where focus went (`focused`: the local names of the elements focus entered), in
        `window.seen` (set up before the element exists: it records from its first state)."""
        self.page.evaluate(
            """() => {
              window.seen = { states: [], events: [], processingHeights: [], focused: [] };
              document.addEventListener('focusin', (e) => window.seen.focused.push(e.target.localName));
              const watch = (el) => {
                new MutationObserver(() => window.seen.states.push(el.getAttribute('state')))
                  .observe(el, { attributes: true, attributeFilter: ['state'] });
                new ResizeObserver(() => {
                  if (el.getAttribute('state') === 'processing') {
                    window.seen.processingHeights.push(el.getBoundingClientRect().height);
                  }
                }).observe(el);
              };
              for (const name of ['purchase-succeeded', 'purchase-failed', 'unauthorized']) {
                document.addEventListener('ciris-billing:' + name,
                  (e) => window.seen.events.push({ name, detail: e.detail }));
              }
              new MutationObserver((changes) => {
                for (const change of changes) for (const node of change.addedNodes) {
                  if (node.localName === 'ciris-billing') watch(node);
                }
              }).observe(document.body, { childList: true, subtree: true });
            }"""
        )

    def seen(self) -> dict[str, Any]:
        result: dict[str, Any] = self.page.evaluate("window.seen")
        return result

    def wait_for_state(self, state: str, timeout: float = 15_000) -> None:
        self.page.wait_for_function(
            f"document.querySelector('{ELEMENT}')?.getAttribute('state') === {state!r}", timeout=timeout
        )

    def state(self) -> str | None:
        value: str | None = self.element.get_attribute("state")
        return value

    def token(self) -> str:
        value: str = self.page.evaluate(f"document.querySelector('{ELEMENT}').token")
        return value

    def status_text(self) -> str:
        text: str = self.part("status").inner_text()
        return text

    def total(self) -> int:
        return int(self.page.locator(f"{ELEMENT} .total .number").inner_text())

    def spend(self, times: int) -> None:
        """Use the agent `times` times through its gated endpoint, as the host app would."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        for _ in range(times):
            reply = self.page.request.post(
                self.url + INTERACT_PATH, headers=headers, data={"message": "hello"}
            )
            assert reply.ok, reply.text()

    def fill_card(self, number: str, expiry: str = "12 / 34", cvc: str = "123") -> None:
        self.page.fill("input[name=cardnumber]", number)
        self.page.fill("input[name=exp-date]", expiry)
        self.page.fill("input[name=cvc]", cvc)

    def start_purchase(self) -> None:
        self.part("buy").click()
        self.wait_for_state("paying")
