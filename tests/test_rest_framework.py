"""
The REST API filter (semantic.contrib.rest_framework) through the demo's
/api/articles/, with DRF's test client against the real database and the
real all-MiniLM-L6-v2: each ranking is checked against the ORM call it
stands for, each refused input against its status and message.
"""

import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from project.demo.api import ArticleViewSet
from project.demo.models import Article
from semantic.contrib.rest_framework import SemanticOrderingFilter, SemanticSearchFilter
from semantic.worker import embed_stale_rows

# Not transactional: the rows stay invisible to the in-thread worker other
# modules start; this module embeds them itself.
pytestmark = pytest.mark.django_db

URL = "/api/articles/"
QUERY = "mobile phone sales and new handsets"
ARTICLES = 20


@pytest.fixture
def articles():
    call_command("load_demo_corpus", limit=ARTICLES, verbosity=0)
    assert embed_stale_rows(Article._meta.get_field("embedding"), time_budget=300).written == ARTICLES
    return Article.objects.all()


@pytest.fixture(autouse=True)
def no_rate_limit(settings):
    """Searches from the test client's one address are not limited, except where a test sets a rate."""
    settings.SEMANTIC = {**settings.SEMANTIC, "SEARCH_RATE": None}


@pytest.fixture
def api():
    return APIClient()


def get(api, **params):
    response = api.get(URL, params)
    assert response.status_code == 200, response.content
    return response.json()


def ids(body):
    return [row["id"] for row in body["results"]]


def test_search_ranks_by_meaning_in_the_orms_order_with_scores(api, articles):
    expected = list(Article.objects.semantic_search(QUERY, k=100))
    body = get(api, search=QUERY, page_size=50)
    assert ids(body) == [a.pk for a in expected]
    assert body["count"] == ARTICLES
    assert [row["score"] for row in body["results"]] == pytest.approx([a.score for a in expected], abs=1e-6)
    # The view's default ordering (by id) did not replace relevance.
    assert ids(body) != sorted(ids(body))
    assert all(row["hybrid_score"] is None for row in body["results"])


def test_an_articles_own_title_finds_it_first(api, articles):
    target = articles.get(source_file="tech/001.txt")
    first = get(api, search=target.title)["results"][0]
    assert first["id"] == target.pk and first["title"] == target.title
    assert 0 < first["score"] <= 1


def test_hybrid_mode_ranks_as_hybrid_search_does(api, articles):
    target = articles.get(source_file="business/001.txt")
    expected = list(Article.objects.hybrid_search(target.title, k=100))
    body = get(api, search=target.title, search_mode="hybrid", page_size=50)
    assert ids(body) == [a.pk for a in expected]
    assert ids(body)[0] == target.pk
    assert [row["hybrid_score"] for row in body["results"]] == pytest.approx([a.hybrid_score for a in expected])
    assert body["results"][0]["score"] == pytest.approx(expected[0].score)
    hybrid_scores = [row["hybrid_score"] for row in body["results"]]
    assert hybrid_scores == sorted(hybrid_scores, reverse=True)


@pytest.mark.parametrize("params", [{}, {"search": ""}, {"search": "   "}, {"search_mode": "hybrid"}])
def test_without_a_search_the_list_is_plain(api, articles, params):
    body = get(api, page_size=50, **params)
    assert body["count"] == ARTICLES
    assert ids(body) == sorted(a.pk for a in articles)
    assert all(row["score"] is None and row["hybrid_score"] is None for row in body["results"])


def test_pages_continue_the_ranking_without_overlap(api, articles):
    expected = [a.pk for a in Article.objects.semantic_search(QUERY, k=100)]
    first = get(api, search=QUERY, page_size=4)
    second = api.get(first["next"]).json()
    assert first["count"] == second["count"] == ARTICLES
    assert ids(first) + ids(second) == expected[:8]
    assert not set(ids(first)) & set(ids(second))
    # The next link keeps the search.
    assert "search=" in first["next"] and "page=2" in first["next"]


def test_results_are_bounded_by_the_views_k(api, articles, monkeypatch):
    monkeypatch.setattr(ArticleViewSet, "semantic_search_k", 5, raising=False)
    expected = [a.pk for a in Article.objects.semantic_search(QUERY, k=5)]
    body = get(api, search=QUERY, page_size=50)
    assert body["count"] == 5 and ids(body) == expected
    # An explicit ordering reorders those five, and only those.
    by_title = get(api, search=QUERY, ordering="title", page_size=50)
    assert by_title["count"] == 5
    assert ids(by_title) == [a.pk for a in sorted(Article.objects.filter(pk__in=expected), key=lambda a: a.title)]
    assert ids(by_title) != expected


def test_explicit_ordering_wins_and_score_orders_only_a_search(api, articles):
    expected = [a.pk for a in Article.objects.semantic_search(QUERY, k=100)]
    assert ids(get(api, search=QUERY, ordering="-score", page_size=50)) == expected
    assert ids(get(api, search=QUERY, ordering="score", page_size=50)) == expected[::-1]
    by_topic = get(api, search=QUERY, ordering="topic", page_size=50)
    # Within a topic, relevance breaks the tie.
    assert ids(by_topic) == sorted(expected, key=lambda pk: (articles.get(pk=pk).topic, expected.index(pk)))
    # Without a search there is no score to order by: ignored, not a database error.
    assert ids(get(api, ordering="-score", page_size=50)) == sorted(a.pk for a in articles)


def test_topic_filter_narrows_what_the_search_ranks(api, articles):
    expected = [a.pk for a in Article.objects.filter(topic="business").semantic_search(QUERY, k=100)]
    body = get(api, search=QUERY, topic="business", page_size=50)
    assert ids(body) == expected and len(expected) == ARTICLES // 5
    assert {row["topic"] for row in body["results"]} == {"business"}
    hybrid = get(api, search=QUERY, topic="business", search_mode="hybrid", page_size=50)
    assert {row["topic"] for row in hybrid["results"]} == {"business"}


def test_min_score_can_leave_nothing(api, articles, monkeypatch):
    monkeypatch.setattr(ArticleViewSet, "semantic_search_options", {"min_score": 0.999}, raising=False)
    body = get(api, search=QUERY)
    assert body["count"] == 0 and body["results"] == []


def test_a_nul_inside_a_query_is_a_word_break(api, articles):
    assert ids(get(api, search="phone\x00sales", page_size=50)) == [a.pk for a in Article.objects.semantic_search("phone sales", k=100)]


@pytest.mark.parametrize(
    "params, parameter, message",
    [
        ({"search": "x" * 1001}, "search", "longer than 1000 characters"),
        ({"search": "x" * 100_000}, "search", "longer than 1000 characters"),
        ({"search": "\x00\x01\x7f"}, "search", "non-empty query"),
        ({"search": "phones", "search_mode": "nonsense"}, "search_mode", "Unknown search mode"),
        ({"search_mode": "keyword"}, "search_mode", "Unknown search mode"),
        ({"search": "phones", "topic": "te\x00ch"}, "topic", "Null characters are not allowed"),
    ],
)
def test_refused_input_is_a_400_with_a_json_message(api, articles, params, parameter, message):
    response = api.get(URL, params)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert list(body) == [parameter] and message in body[parameter][0]


def test_anonymous_searches_are_rate_limited_per_address(api, articles, settings, admin_user):
    settings.SEMANTIC = {**settings.SEMANTIC, "SEARCH_RATE": "3/m"}
    # An address no earlier run used this minute (counters outlive tests).
    address = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::7"
    statuses = [api.get(URL, {"search": f"rate {i}"}, REMOTE_ADDR=address).status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert "detail" in api.get(URL, {"search": "again"}, REMOTE_ADDR=address).json()
    # Listing and paging embed nothing: not counted.
    assert api.get(URL, {"page": 2}, REMOTE_ADDR=address).status_code == 200
    other = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::8"
    assert api.get(URL, {"search": "another client"}, REMOTE_ADDR=other).status_code == 200
    api.force_login(admin_user)
    assert api.get(URL, {"search": "staff"}, REMOTE_ADDR=address).status_code == 200


def test_a_detail_page_has_no_score(api, articles):
    target = articles.first()
    body = api.get(f"{URL}{target.pk}/").json()
    assert body["id"] == target.pk and body["score"] is None


def test_the_openapi_schema_describes_the_search_parameters(api):
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    operation = response.json()["paths"][URL]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["search"]["schema"] == {"type": "string", "maxLength": django_settings.SEMANTIC.get("QUERY_MAX_CHARS", 1000)}
    assert parameters["search_mode"]["schema"]["enum"] == ["semantic", "hybrid"]
    assert {"topic", "ordering", "page", "page_size"} <= set(parameters)
    assert {"200", "400", "404", "429"} <= set(operation["responses"])


def test_drfs_own_schema_generator_reads_the_parameters():
    from rest_framework.schemas.openapi import AutoSchema

    class View(ArticleViewSet):
        # django-filter 26's backend no longer speaks to DRF's generator.
        filter_backends = [SemanticSearchFilter, SemanticOrderingFilter]

    schema = AutoSchema()
    schema.view = View(action="list")
    parameters = {p["name"]: p for p in schema.get_filter_parameters(URL, "GET")}
    assert set(parameters) == {"search", "search_mode", "ordering"}
    assert parameters["search_mode"]["schema"]["default"] == "semantic"


def test_filter_and_ordering_need_no_search_to_pass_the_queryset_through():
    request = Request(APIRequestFactory().get(URL, {"ordering": "score"}))
    queryset = Article.objects.all()
    view = ArticleViewSet()
    assert SemanticSearchFilter().filter_queryset(request, queryset, view) is queryset
    # Only "score" was asked for, and there is none: the view's default ordering.
    assert SemanticOrderingFilter().get_ordering(request, queryset, view) == ["id"]


def test_semantic_and_its_other_modules_import_without_rest_framework():
    """With rest_framework unimportable, every module of semantic but semantic.contrib's imports."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "rest_framework":
                    raise ImportError(f"{name} is not installed here")

        sys.meta_path.insert(0, Refuse())
        import django
        from django.conf import settings

        settings.configure(
            INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
                            "django.contrib.sessions", "django.contrib.messages", "django.contrib.postgres", "semantic"],
            DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "unused"}},
        )
        django.setup()
        import semantic

        names = [m.name for m in pkgutil.walk_packages(semantic.__path__, "semantic.") if not m.name.startswith("semantic.contrib.")]
        for name in names:
            importlib.import_module(name)
        assert not [m for m in sys.modules if m.split(".")[0] == "rest_framework"]
        try:
            import semantic.contrib.rest_framework  # noqa: F401
        except ImportError:
            print(" ".join(names))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(django_settings.BASE_DIR)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The refusal worked (contrib's module could not load), and the walk reached the app's modules.
    imported = result.stdout.split()
    assert {"semantic.querysets", "semantic.admin", "semantic.retrieval.hybrid", "semantic.contrib"} <= set(imported)
