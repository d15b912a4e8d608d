"""The demo app: corpus loading, the worker embedding it, the search page."""

import pytest
from django.core.management import call_command
from django.utils.html import escape

from project.demo.corpus import iter_articles
from project.demo.models import Article
from tests.conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_corpus_is_read_from_the_installed_wheel():
    articles = list(iter_articles(limit=5))
    assert len(articles) == 5
    assert all(a.title and a.body and "\n" not in a.title for a in articles)
    assert sum(1 for _ in iter_articles()) == 2225


@pytest.fixture
def demo_articles(celery_worker):
    call_command("load_demo_corpus", limit=12, verbosity=0)
    call_command("load_demo_corpus", limit=12, verbosity=0)  # idempotent
    assert Article.objects.count() == 12
    wait_until(lambda: not Article.objects.filter(embedding=None).exists(), timeout=120, message="demo articles embedded")
    return Article.objects.all()


def test_search_page_ranks_the_matching_article_first(client, demo_articles):
    target = demo_articles.get(source_file="business/001.txt")
    response = client.get("/", {"q": target.title})
    assert response.status_code == 200
    results = response.context["results"]
    assert results[0].pk == target.pk
    assert results[0].score > results[-1].score
    assert f"{results[0].score:.3f}" in response.content.decode()
    # Articles are chunked: the page shows the passage that matched.
    assert results[0].best_chunk.owner_id == target.pk
    assert " ".join(results[0].best_chunk.text.split()[:6]) in response.content.decode()


def test_hybrid_mode_ranks_the_matching_article_first(client, demo_articles):
    target = demo_articles.get(source_file="business/001.txt")
    response = client.get("/", {"q": target.title, "mode": "hybrid"})
    assert response.status_code == 200
    results = response.context["results"]
    assert results[0].pk == target.pk
    assert results[0].text_rank == 1


@pytest.mark.parametrize("mode", ["semantic", "hybrid", "nonsense"])
@pytest.mark.parametrize("query", ["", "x" * 10_000, "'; DROP TABLE demo_article; --", 'a "b -c or', "phone\x00sales", "\x00\x1f\x7f"])
def test_search_page_answers_odd_queries_with_results_or_a_message(client, demo_articles, query, mode):
    response = client.get("/", {"q": query, "mode": mode})
    assert response.status_code in (200, 400)
    if response.status_code == 400:
        assert response.context["error"] and escape(response.context["error"]) in response.content.decode()
    assert Article.objects.count() == 12


@pytest.mark.parametrize("params", [{"q": "phone\x00sales", "mode": "hybrid"}, {"topic": "te\x00ch"}, {"q": "phones", "topic": "te\x00ch"}])
def test_the_reported_nul_urls_answer_without_an_error_page(client, demo_articles, params):
    response = client.get("/", params)
    assert response.status_code in (200, 400)
    if "q" in params and "topic" not in params:
        # The NUL is a word break: the query is searched.
        assert response.status_code == 200 and response.context["query"] == "phone sales"
        assert response.context["results"]


def test_anonymous_searches_are_rate_limited_per_address(client, admin_client, demo_articles, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "SEARCH_RATE": "3/m"}
    statuses = [client.get("/", {"q": f"rate limited search {i}"}, REMOTE_ADDR="203.0.113.7").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    # Another address, and signed-in staff, are not counted against it.
    assert client.get("/", {"q": "another visitor"}, REMOTE_ADDR="203.0.113.8").status_code == 200
    assert admin_client.get("/", {"q": "staff"}, REMOTE_ADDR="203.0.113.7").status_code == 200


def test_search_page_filters_by_topic(client, demo_articles):
    response = client.get("/", {"q": "company profits", "topic": "business"})
    assert response.status_code == 200
    results = response.context["results"]
    assert results and {a.topic for a in results} == {"business"}
    assert Article.objects.exclude(topic="business").exists()


def test_admin_lists_articles(admin_client, demo_articles):
    response = admin_client.get("/admin/demo/article/")
    assert response.status_code == 200
    assert demo_articles.first().title in response.content.decode()


def test_an_unknown_topic_is_a_message(client, demo_articles):
    response = client.get("/", {"q": "profits", "topic": "astrology"})
    assert response.status_code == 400
    assert "Invalid filter: topic" in response.context["error"]


def test_search_results_link_to_article_pages_with_similar_articles(client, demo_articles):
    target = demo_articles.get(source_file="business/001.txt")
    results = client.get("/", {"q": target.title}).context["results"]
    assert results[0].get_absolute_url() == f"/articles/{target.pk}/"
    response = client.get(f"/articles/{target.pk}/")
    assert response.status_code == 200
    expected = list(Article.objects.similar_to(target, k=5))
    html = response.content.decode()
    positions = [html.index(f'href="/articles/{row.pk}/"') for row in expected]
    assert positions == sorted(positions) and len(expected) == 5
    assert client.get("/articles/999999/").status_code == 404
