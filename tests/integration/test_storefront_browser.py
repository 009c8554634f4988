"""The demo storefront in a real browser: Debian's chromium driven by Playwright, against
`instantrec serve` running as its own process on loopback.

A shopper types a query, applies filters, clicks a result; the clicked item moves up in the
next results and every event reaches the durable log. The page is saved as a screenshot
(``$INSTANTREC_TEST_ARTEFACTS``, default ``test-artefacts/``, beside the checkout's tests).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipelines.service import ServiceProcess
from serving.eventlog import SqliteEventLog, iter_all

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(os.environ.get("INSTANTREC_TEST_ARTEFACTS",
                                Path(__file__).resolve().parents[2] / "test-artefacts"))


@pytest.fixture(scope="module")
def server(demo_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("storefront") / "home"
    shutil.copytree(demo_home, home)
    with ServiceProcess(home, home / "serve.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-deps` (apt-get install chromium)",
                    pytrace=False)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def _results(page) -> list[dict[str, str]]:
    return page.eval_on_selector_all("#results .result", """nodes => nodes.map(n => ({
        id: n.dataset.itemId, rank: Number(n.dataset.rank),
        price: n.querySelector('.price').textContent,
        stock: n.querySelector('.stock').textContent}))""")


def test_search_filter_click_and_the_item_moves_up(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#category option").count() > 1  # categories from /facets

    page.fill("#q", "running shoes")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .result")
    unfiltered = _results(page)
    assert any(r["stock"] == "out of stock" or float(r["price"].lstrip("$").replace(",", ""))
               > 150 for r in unfiltered)

    # filters: at most $150, in stock; every change asks again
    sent = page.evaluate("document.body.dataset.eventsSent")
    page.fill("#max-price", "150")
    page.dispatch_event("#max-price", "change")
    page.check("#in-stock")
    page.wait_for_function("prev => document.body.dataset.eventsSent !== prev", arg=sent)
    page.wait_for_function("document.querySelectorAll('#results .stock.out').length === 0")
    filtered = _results(page)
    assert filtered and all(r["stock"] == "in stock" for r in filtered)
    assert all(float(r["price"].lstrip("$").replace(",", "")) <= 150 for r in filtered)

    # click the third result: the page records the click and asks again
    target = filtered[2]
    session = page.text_content("#session-id")
    page.locator(f"#results .result[data-item-id='{target['id']}'] button.click").click()
    page.wait_for_selector(f"#results .result.clicked[data-item-id='{target['id']}']")
    page.wait_for_function("document.querySelectorAll('#interactions li:not(.muted)').length > 0")
    after = {r["id"]: r["rank"] for r in _results(page)}
    assert after[target["id"]] < target["rank"], (target, after)
    assert page.locator(f"#results .result[data-item-id='{target['id']}'] .move.up").count() == 1
    assert page.text_content("#interactions li").startswith(
        page.text_content(f"#results .result[data-item-id='{target['id']}'] .title"))

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "storefront.png"), full_page=True)
    assert not errors, errors

    # the impressions and the click reached the durable log, for this session
    log = SqliteEventLog(server.home / "events" / "events.db")
    try:
        events = [e.event for e in iter_all(log) if e.event.session_id == session]
    finally:
        log.close()
    clicks = [e for e in events if e.type == "click"]
    assert [(e.item_id, e.position, e.query) for e in clicks] == [
        (target["id"], target["rank"], "running shoes")]
    assert sum(e.type == "impression" for e in events) >= 2 * len(filtered)
