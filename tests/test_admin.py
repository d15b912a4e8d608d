"""The admin changelist of a SemanticAdminMixin admin (the demo's ArticleAdmin).

Real database, real worker: the demo articles are embedded by the Celery
worker with all-MiniLM-L6-v2 before each test, as in tests/test_demo.py.
"""

import numpy as np
import pytest
from django.contrib import admin
from django.db import transaction
from django.db.models import F

from project.demo.models import Article
from semantic.admin import KEYWORD, format_vector, keyword_reason
from semantic.status import embedding_status, status_q as embedding_status_q
from tests.conftest import wait_until
from tests.test_demo import demo_articles  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/admin/demo/article/"
FIELD = Article._meta.get_field("embedding")


def listed(response):
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def search_of(response):
    return response.context["cl"].semantic_search


@pytest.fixture
def article_admin():
    return admin.site._registry[Article]


@pytest.fixture
def target(demo_articles):  # noqa: F811
    return demo_articles.get(source_file="business/002.txt")  # "Dollar gains on Greenspan speech"


def test_semantic_search_ranks_the_article_first(admin_client, target):
    response = admin_client.get(URL, {"q": target.title})
    rows = listed(response)
    assert rows[0].pk == target.pk
    # Every embedded row has some distance: all twelve are listed, best first.
    assert len(rows) == 12
    scores = [row.score for row in rows]
    assert scores == sorted(scores, reverse=True)
    page = response.content.decode()
    assert "Relevance" in page and f"{rows[0].score:.3f}" in page
    assert "Ranked by meaning" in page
    # The way out to the keyword search is on the page.
    assert "search_mode=keyword" in page and "Search by keyword instead" in page
    assert search_of(response).mode == "semantic"


def test_list_filter_applies_and_keeps_the_relevance_order(admin_client, target):
    everything = [row.pk for row in listed(admin_client.get(URL, {"q": "central bank interest rates"}))]
    response = admin_client.get(URL, {"q": "central bank interest rates", "topic__exact": "business"})
    rows = listed(response)
    business = set(Article.objects.filter(topic="business").values_list("pk", flat=True))
    assert [row.pk for row in rows] == [pk for pk in everything if pk in business]
    assert {row.topic for row in rows} == {"business"} and len(rows) == 3
    # The filter sidebar keeps the search (and the search form keeps the filter).
    page = response.content.decode()
    assert '<input type="hidden" name="topic__exact" value="business">' in page
    assert "q=central+bank+interest+rates" in page
    # Facet counts ("Show counts") run the filtered search once per filter.
    facets = admin_client.get(URL, {"q": "central bank interest rates", "topic__exact": "business", "_facets": ""})
    assert [row.pk for row in listed(facets)] == [pk for pk in everything if pk in business]
    assert "business (3)" in facets.content.decode()
    # A status filter on top of both.
    rows = listed(
        admin_client.get(URL, {"q": "central bank interest rates", "topic__exact": "business", "embedding_status": "fresh"})
    )
    assert [row.pk for row in rows] == [pk for pk in everything if pk in business]


def test_relevance_order_beats_the_model_ordering_and_a_header_click_wins(admin_client, target):
    # Article.Meta.ordering is topic, source_file: a search must not be sorted by it.
    rows = listed(admin_client.get(URL, {"q": "television and film stars"}))
    assert [r.pk for r in rows] != list(Article.objects.values_list("pk", flat=True))
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    # Sorting by a column (o=1: title, after the action checkbox) is the user's choice, relevance breaks ties.
    rows = listed(admin_client.get(URL, {"q": "television and film stars", "o": "1"}))
    assert [r.title for r in rows] == sorted(r.title for r in rows)


def test_pagination_counts_and_the_limit(admin_client, article_admin, target, monkeypatch):
    monkeypatch.setattr(article_admin, "list_per_page", 5)
    monkeypatch.setattr(article_admin, "semantic_search_limit", 8)
    top8 = [a.pk for a in Article.objects.semantic_search(target.title, k=8)]

    first = admin_client.get(URL, {"q": target.title})
    cl = first.context["cl"]
    assert cl.result_count == 8 and cl.full_result_count == 12
    assert cl.paginator.num_pages == 2
    assert "8 results" in first.content.decode() and "12 total" in first.content.decode()
    second = admin_client.get(URL, {"q": target.title, "p": "2"})
    assert [r.pk for r in listed(first)] + [r.pk for r in listed(second)] == top8
    assert len(listed(second)) == 3
    assert "the 8 closest rows at most" in first.content.decode()


def test_keyword_mode_is_djangos_search(admin_client, target):
    response = admin_client.get(URL, {"q": "Greenspan", "search_mode": KEYWORD})
    rows = listed(response)
    expected = Article.objects.filter(title__icontains="Greenspan") | Article.objects.filter(body__icontains="Greenspan")
    assert {r.pk for r in rows} == set(expected.values_list("pk", flat=True)) and target.pk in {r.pk for r in rows}
    assert search_of(response).mode == KEYWORD
    page = response.content.decode()
    assert "Relevance" not in page
    assert "Keyword search in title, body" in page and "search_mode=semantic" in page
    # The select keeps the choice.
    assert '<option value="keyword" selected>' in page


def test_hybrid_mode(admin_client, target):
    response = admin_client.get(URL, {"q": target.title, "search_mode": "hybrid"})
    rows = listed(response)
    assert rows[0].pk == target.pk and rows[0].text_rank == 1
    assert "hybrid search" in response.content.decode()


@pytest.mark.parametrize("term", ["2004", "#12", "  1,000 ", '"Time Warner"', "8b0e2c1a-7d2f-4f8e-9d1e-0c2b3a4d5e6f"])
def test_auto_mode_searches_ids_numbers_and_quotes_by_keyword(admin_client, demo_articles, term):  # noqa: F811
    response = admin_client.get(URL, {"q": term})
    listed(response)
    search = search_of(response)
    assert search.mode == KEYWORD and search.reason == keyword_reason(term)
    assert "Keyword search: the term" in response.content.decode()


def test_numeric_term_lists_the_keyword_matches_unless_semantic_is_chosen(admin_client, demo_articles):  # noqa: F811
    rows = listed(admin_client.get(URL, {"q": "2004"}))
    expected = Article.objects.filter(title__contains="2004") | Article.objects.filter(body__contains="2004")
    assert {r.pk for r in rows} == set(expected.values_list("pk", flat=True))
    assert len(rows) < 12
    response = admin_client.get(URL, {"q": "2004", "search_mode": "semantic"})
    assert len(listed(response)) == 12 and search_of(response).mode == "semantic"


def test_status_column_and_filter(admin_client, demo_articles):  # noqa: F811
    fresh_page = admin_client.get(URL)
    assert fresh_page.content.decode().count('class="semantic-status semantic-status-fresh"') == 12
    stale, missing, outdated, failed = demo_articles.order_by("pk")[:4]
    # Inside a transaction the worker cannot see: nothing is re-embedded under the test.
    with transaction.atomic():
        Article.objects.filter(pk=stale.pk).mark_stale()
        Article.objects.filter(pk=missing.pk).update(embedding=None, embedding_vector_hash=None)
        Article.objects.filter(pk=outdated.pk).update(embedding_vector_hash="0" * 56, embedding_source_hash="0" * 56)
        Article.objects.filter(pk=failed.pk).update(
            embedding_failed_hash=F("embedding_source_hash"), embedding_attempts=3, embedding_error="the tokenizer gave up"
        )
        empty = Article.objects.create(topic="tech", title="", body="  ", source_file="tech/empty.txt")
        expected = {"stale": [stale.pk], "missing": [missing.pk], "outdated": [outdated.pk], "failed": [failed.pk], "no_text": [empty.pk]}
        for status, pks in expected.items():
            assert [r.pk for r in listed(admin_client.get(URL, {"embedding_status": status}))] == pks
            assert list(Article.objects.filter(embedding_status_q(FIELD, status)).values_list("pk", flat=True)) == pks
        fresh = listed(admin_client.get(URL, {"embedding_status": "fresh"}))
        assert len(fresh) == 8 and {embedding_status(FIELD, r) for r in fresh} == {"fresh"}
        page = admin_client.get(URL).content.decode()
        for status in expected:
            assert page.count(f'class="semantic-status semantic-status-{status}"') == 1
        assert page.count('class="semantic-status semantic-status-fresh"') == 8
        assert ">no text</a>" in page and ">other model</a>" in page and ">failed</a>" in page  # the filter's choices
        assert "3 attempt(s): the tokenizer gave up" in page  # a failed row's error, on its status
        transaction.set_rollback(True)


def test_mark_stale_action(admin_client, demo_articles):  # noqa: F811
    chosen = list(demo_articles.order_by("pk").values_list("pk", flat=True)[:3])
    response = admin_client.post(
        URL, {"action": "semantic_mark_stale", "_selected_action": chosen, "index": 0}, follow=True
    )
    assert response.status_code == 200
    assert "3 row(s) marked stale" in response.content.decode()
    stale = Article.objects.filter(embedding_status_q(FIELD, "stale"))
    assert sorted(stale.values_list("pk", flat=True)) == chosen
    assert Article.objects.filter(embedding_status_q(FIELD, "fresh")).count() == 9


def test_reembed_action_applies_to_the_searched_filtered_rows(admin_client, demo_articles):  # noqa: F811
    business = sorted(Article.objects.filter(topic="business").values_list("pk", flat=True))
    with transaction.atomic():
        # "Select all" across the searched, filtered list: the action gets that queryset.
        response = admin_client.post(
            f"{URL}?q=company+profits&topic__exact=business",
            {"action": "semantic_reembed", "_selected_action": business[:1], "select_across": 1, "index": 0},
        )
        assert response.status_code == 302
        assert sorted(Article.objects.filter(embedding_status_q(FIELD, "stale")).values_list("pk", flat=True)) == business
    # Committed: the worker was woken and re-embeds them.
    wait_until(
        lambda: Article.objects.filter(embedding_status_q(FIELD, "fresh")).count() == 12,
        timeout=60,
        message="re-embedded articles",
    )


def test_actions_need_the_change_permission(client, django_user_model, demo_articles):  # noqa: F811
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_article"))
    client.force_login(viewer)
    response = client.get(URL, {"q": "company profits"})
    assert response.status_code == 200
    assert "semantic_reembed" not in response.content.decode()


@pytest.mark.parametrize("listed", [False, True], ids=["offered by the mixin", "listed in actions"])
def test_view_only_staff_get_no_embedding_actions_however_they_are_offered(django_user_model, listed):
    from django.contrib.auth.models import Permission
    from django.test import RequestFactory

    from semantic import SemanticAdminMixin

    class ListingAdmin(SemanticAdminMixin, admin.ModelAdmin):
        actions = ["semantic_reembed", "semantic_mark_stale"] if listed else []

    model_admin = ListingAdmin(Article, admin.AdminSite(name="actions-test"))
    viewer = django_user_model.objects.create_user("viewer2", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_article"))
    editor = django_user_model.objects.create_user("editor2", password="pw", is_staff=True)
    editor.user_permissions.add(Permission.objects.get(codename="change_article"))
    for user, offered in ((viewer, False), (editor, True)):
        request = RequestFactory().get(URL)
        request.user = django_user_model.objects.get(pk=user.pk)  # a fresh permission cache
        names = set(model_admin.get_actions(request))
        assert ({"semantic_reembed", "semantic_mark_stale"} <= names) is offered
        assert offered or not names & {"semantic_reembed", "semantic_mark_stale"}


def test_change_page_shows_the_vector_read_only_and_saves_without_touching_it(admin_client, target):
    before = Article.objects.get(pk=target.pk)
    url = f"{URL}{target.pk}/change/"
    response = admin_client.get(url)
    assert response.status_code == 200
    page = response.content.decode()
    assert format_vector(before.embedding) in page and "384 dims: [" in page and 'semantic-status-fresh" title="' in page and '>fresh</span>)' in page
    assert 'name="embedding' not in page  # no input for the vector or its hashes
    assert "<textarea" in page  # the body is still editable

    data = {"topic": target.topic, "title": target.title, "body": target.body, "source_file": target.source_file}
    response = admin_client.post(url, {**data, "_save": "Save"})
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    after = Article.objects.get(pk=target.pk)
    assert np.array_equal(after.embedding, before.embedding)
    assert (after.embedding_source_hash, after.embedding_vector_hash) == (
        before.embedding_source_hash,
        before.embedding_vector_hash,
    )
    assert embedding_status(FIELD, after) == "fresh"


def test_a_vector_named_in_list_display_or_readonly_fields_is_shown_short(admin_client, article_admin, target, monkeypatch):
    # Django's display_for_field fails on a numpy vector: the mixin swaps in the short display.
    monkeypatch.setattr(article_admin, "list_display", ["title", "embedding"])
    monkeypatch.setattr(article_admin, "readonly_fields", ["embedding", "embedding_source_hash"])
    page = admin_client.get(URL).content.decode()
    assert page.count("384 dims: [") == 12
    response = admin_client.get(f"{URL}{target.pk}/change/")
    assert response.status_code == 200
    assert response.content.decode().count("384 dims: [") == 1
    assert target.embedding_source_hash in response.content.decode()
    assert admin_client.get(f"{URL}add/").status_code == 200
    # A declared layout naming the vector, on the change and the add page.
    monkeypatch.setattr(article_admin, "readonly_fields", [])
    monkeypatch.setattr(article_admin, "fieldsets", [(None, {"fields": [("title", "topic"), "body", "source_file", "embedding"]})])
    response = admin_client.get(f"{URL}{target.pk}/change/")
    assert response.status_code == 200 and "384 dims: [" in response.content.decode()
    response = admin_client.get(f"{URL}add/")
    assert response.status_code == 200 and "no vector" in response.content.decode()


def test_no_embedded_rows_falls_back_to_keyword_search(admin_client, celery_worker):
    with transaction.atomic():  # the worker cannot see these rows: none has a vector
        Article.objects.create(topic="tech", title="Broadband use grows", body="More homes are online.", source_file="t/1")
        Article.objects.create(topic="tech", title="Games sales rise", body="Consoles sell well.", source_file="t/2")
        response = admin_client.get(URL, {"q": "broadband"}, follow=True)
        rows = listed(response)
        assert [r.title for r in rows] == ["Broadband use grows"]
        page = response.content.decode()
        assert "No row of this list has an embedding yet: keyword search used." in page
        assert "Keyword search: the term could not be ranked" in page
        transaction.set_rollback(True)


@pytest.mark.parametrize("mode", ["", "semantic", "hybrid", "keyword", "nonsense"])
@pytest.mark.parametrize("term", ["", "   ", "x" * 10_000, "word " * 2_000, "'; DROP TABLE demo_article; --", 'a "b -c or'])
def test_odd_terms_give_a_normal_page(admin_client, demo_articles, term, mode):  # noqa: F811
    response = admin_client.get(URL, {"q": term, "search_mode": mode})
    assert response.status_code == 200
    assert Article.objects.count() == 12
    if not term.strip():
        assert len(listed(response)) == 12 and "Relevance" not in response.content.decode()


def test_a_misconfigured_reranker_falls_back_to_keyword_search(admin_client, demo_articles, settings, tmp_path):  # noqa: F811
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": str(tmp_path / "no-such-model")}
    response = admin_client.get(URL, {"q": "Greenspan"})
    rows = listed(response)
    assert search_of(response).mode == KEYWORD
    assert rows and all("Greenspan" in r.title + r.body for r in rows)
    assert "Semantic search failed, keyword search used" in response.content.decode()


def test_a_configured_reranker_reranks(admin_client, demo_articles, settings, cross_encoder_dir):  # noqa: F811
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": str(cross_encoder_dir)}
    response = admin_client.get(URL, {"q": "company profits"})
    rows = listed(response)
    assert search_of(response).rerank and len(rows) == 12
    scores = [r.rerank_score for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "reranked by a cross-encoder" in response.content.decode()
