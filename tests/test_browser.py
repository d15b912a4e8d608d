"""The admin's semantic search in a real browser: headless Chromium driven by Playwright.

Uses Debian's Chromium (``apt-get install chromium chromium-driver``; .ci/run
installs it), never a browser downloaded by ``playwright install``. Skipped,
with the reason, only when that browser is absent.
"""

import os
from contextlib import contextmanager
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

@contextmanager
def browser_page(width):
    """A page of a fresh headless Chromium (Debian's), closed afterwards."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


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
    from playwright.sync_api import expect

    # The ORM before the browser starts: Playwright's sync API runs an event
    # loop, under which Django refuses synchronous database calls.
    target = demo_articles.get(source_file="business/002.txt")
    title, business = target.title, demo_articles.filter(topic="business").count()
    screenshot = ARTIFACTS / "admin-semantic-search.png"

    with browser_page(1400) as page:
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

    assert set(topics) == {"business"}
    assert titles == [t for t in before if t in titles]  # the relevance order, kept
    assert scores == sorted(scores, reverse=True)
    assert screenshot.stat().st_size > 10_000


def test_demo_search_pages_highlights_and_similar_articles(live_server, demo_articles):  # noqa: F811
    """A visitor's path through the demo: a search, its second page, a hybrid
    search with the query's words marked, and an article page with its
    similar articles. Screenshots: ``demo-search.png``, ``demo-search-page-2.png``,
    ``demo-hybrid-search.png`` and ``demo-article.png``."""
    from playwright.sync_api import expect

    target = demo_articles.get(source_file="business/001.txt")
    title, total = target.title, demo_articles.count()
    title_words = [w.strip(".,'\"").lower() for w in title.split()]

    with browser_page(1200) as page:
        page.goto(f"{live_server.url}/")
        page.fill("input[name=q]", "stock market and company profits")
        page.press("input[name=q]", "Enter")
        results = page.locator("ol.semantic-results > li")
        expect(results).to_have_count(10)
        first_page = results.locator("strong").all_inner_texts()
        page.screenshot(path=str(ARTIFACTS / "demo-search.png"), full_page=True)

        page.get_by_role("link", name="Next").click()
        expect(page.locator("ol.semantic-results")).to_have_attribute("start", "11")
        second_page = results.locator("strong").all_inner_texts()
        page.screenshot(path=str(ARTIFACTS / "demo-search-page-2.png"), full_page=True)
        expect(page.locator("input[name=q]")).to_have_value("stock market and company profits")

        page.fill("input[name=q]", title)
        page.select_option("select[name=mode]", "hybrid")
        page.press("input[name=q]", "Enter")
        expect(results.first.locator("strong")).to_have_text(title)
        marks = results.first.locator(".semantic-snippet mark").all_inner_texts()
        page.screenshot(path=str(ARTIFACTS / "demo-hybrid-search.png"), full_page=True)

        results.first.locator("a").click()
        expect(page.locator("article h1")).to_have_text(title)
        similar = page.locator("#similar-articles li")
        expect(similar).to_have_count(5)
        page.screenshot(path=str(ARTIFACTS / "demo-article.png"), full_page=True)

    # Every article once over the two pages, none on both.
    assert not set(first_page) & set(second_page)
    assert len(first_page) + len(second_page) <= total and len(second_page) >= 1
    # The marked words are the query's (stemmed: "profits" marks "profit").
    assert marks and all(any(w[:4] == m.lower()[:4] for w in title_words) for m in marks)
