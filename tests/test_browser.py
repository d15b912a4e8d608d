"""The admin's semantic search in a real browser: headless Chromium driven by Playwright.

Uses Debian's Chromium (``apt-get install chromium chromium-driver``; .ci/run
installs it), never a browser downloaded by ``playwright install``. Skipped,
with the reason, only when that browser is absent.
"""

import os
from pathlib import Path

import pytest
from django.conf import settings

from tests.test_demo import demo_articles  # noqa: F401 (fixture)

CHROMIUM = Path(os.environ.get("SEMANTIC_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("SEMANTIC_TEST_ARTIFACTS", settings.BASE_DIR / "test-artifacts"))

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium chromium-driver (or set SEMANTIC_CHROMIUM)",
    ),
]


def test_admin_search_ranks_by_meaning_and_keeps_the_order_under_a_filter(live_server, admin_user, demo_articles):  # noqa: F811
    """Log in, search the demo articles by a title, filter by topic.

    The searched article comes first, and stays first with its relevance
    order once the topic filter applies; its change page shows the vector
    read-only. Screenshots of the filtered, searched changelist
    (``admin-semantic-search.png``) and of that change page
    (``admin-change-page.png``) are saved under $SEMANTIC_TEST_ARTIFACTS
    (default ``test-artifacts/``, gitignored).
    """
    from playwright.sync_api import expect, sync_playwright

    # The ORM before the browser starts: Playwright's sync API runs an event
    # loop, under which Django refuses synchronous database calls.
    target = demo_articles.get(source_file="business/002.txt")
    title, business = target.title, demo_articles.filter(topic="business").count()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "admin-semantic-search.png"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"{live_server.url}/admin/login/?next=/admin/demo/article/")
            page.fill("#id_username", admin_user.username)
            page.fill("#id_password", "password")
            page.click("input[type=submit]")
            expect(page.locator("#result_list")).to_be_visible()

            page.fill("#searchbar", title)
            page.press("#searchbar", "Enter")
            rows = page.locator("#result_list tbody tr")
            expect(page.locator("#semantic-search-note")).to_contain_text("Ranked by meaning")
            expect(rows).to_have_count(12)
            expect(rows.first.locator("th a")).to_have_text(title)
            before = rows.locator(".field-title").all_inner_texts()

            page.locator("#changelist-filter").get_by_role("link", name="business", exact=True).click()
            expect(rows).to_have_count(business)
            expect(rows.first.locator("th a")).to_have_text(title)
            expect(page.locator("#searchbar")).to_have_value(title)
            topics = rows.locator(".field-topic").all_inner_texts()
            titles = rows.locator(".field-title").all_inner_texts()
            scores = [float(s) for s in rows.locator(".field-semantic_relevance").all_inner_texts()]
            page.screenshot(path=str(screenshot), full_page=True)

            # The change page shows the vector read-only and short.
            rows.first.locator("th a").click()
            expect(page.locator(".field-semantic_vector .readonly")).to_contain_text("384 dims: [")
            expect(page.locator("[name^=embedding]")).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "admin-change-page.png"), full_page=True)
        finally:
            browser.close()

    assert set(topics) == {"business"}
    assert titles == [t for t in before if t in titles]  # the relevance order, kept
    assert scores == sorted(scores, reverse=True)
    assert screenshot.stat().st_size > 10_000
