"""
The reusable search page (semantic.views.SemanticSearchView), its snippets
(semantic.highlight) and template tags, against the real database: each
ranking is checked against the ORM call it stands for, each visitor input
that is refused against its status and message.
"""

import itertools
import re

import pytest
from django.contrib.auth.models import AnonymousUser, User
from django.template import Context, Template
from django.test import RequestFactory
from django.utils.html import strip_tags

import semantic
from semantic import cache as embedding_cache
from semantic.highlight import START, STOP, highlight
from semantic.templatetags.semantic import SIMILAR_PREFIX, similar_items
from semantic.views import SemanticSearchView
from semantic.worker import embed_stale_rows
from tests.testapp.models import LongNote, Note

# Not transactional: the rows stay invisible to the in-thread worker other
# modules start, so only this module embeds them.
pytestmark = pytest.mark.django_db

TEXTS = {
    "weather": ["Storms and heavy rain hit the coast", "Snow is expected in the hills tonight", "A warm sunny week ahead"],
    "sport": ["The team won the final after extra time", "The captain lifted the trophy", "A record crowd watched the match"],
    "food": ["Fresh bread and soft cheese for lunch", "The bakery sells rye bread on Sundays", "Ripe tomatoes and basil"],
    "music": ["The orchestra played the symphony twice", "Violins carried the slow movement", "A new album of piano music"],
}
_addresses = itertools.count(1)


@pytest.fixture
def notes():
    rows = [
        Note(title=title, body=f"{title}. Filed under {category}.", category=category)
        for category, titles in TEXTS.items()
        for title in titles
    ]
    Note.objects.bulk_create(rows)
    assert embed_stale_rows(Note._meta.get_field("embedding"), time_budget=120).written == len(rows)
    return Note.objects.all()


def get(view_kwargs, params, user=None):
    """Run the view for a GET with ``params``, from an address of its own (rate limits count per address)."""
    request = RequestFactory().get("/search/", params, REMOTE_ADDR=f"10.{next(_addresses) % 250}.{id(params) % 250}.7")
    request.user = user or AnonymousUser()
    options = {"model": Note, "collapse": None, "diversity": None, "rate": None, **view_kwargs}
    response = SemanticSearchView.as_view(**options)(request)
    response.render()
    return response


def pks(rows):
    return [row.pk for row in rows]


def test_an_empty_query_is_the_search_page_not_an_error(notes):
    for params in ({}, {"q": ""}, {"q": "   "}):
        response = get({}, params)
        assert response.status_code == 200
        assert response.context_data["results"] == [] and response.context_data["error"] == ""
        assert b'type="search"' in response.content


@pytest.mark.parametrize("mode", ["semantic", "hybrid"])
def test_the_ranking_is_the_orm_search_paginated(notes, mode):
    query = "bread for lunch"
    if mode == "hybrid":
        expected = pks(Note.objects.hybrid_search(query, k=7))
    else:
        expected = pks(Note.objects.semantic_search(query, k=7))
    pages = []
    for page in (1, 2, 3):
        response = get({"paginate_by": 3, "max_results": 7}, {"q": query, "mode": mode, "page": page})
        assert response.status_code == 200
        context = response.context_data
        assert context["paginator"].count == 7 and context["page_obj"].number == page
        pages.append(pks(context["results"]))
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sum(pages, []) == expected
    # The links keep the query and mode.
    first = get({"paginate_by": 3, "max_results": 7}, {"q": query, "mode": mode}).context_data
    assert first["previous_page_url"] == ""
    assert re.search(r"q=bread\+for\+lunch", first["next_page_url"]) and "page=2" in first["next_page_url"]
    assert f"mode={mode}" in first["next_page_url"]


def test_scores_are_the_orm_scores(notes):
    query = "orchestra"
    expected = {row.pk: row.score for row in Note.objects.semantic_search(query, k=5)}
    results = get({"paginate_by": 5, "max_results": 5}, {"q": query}).context_data["results"]
    assert {row.pk: row.score for row in results} == pytest.approx(expected)


def test_keyword_mode_ranks_the_rows_containing_the_words(notes):
    response = get({}, {"q": "bread", "mode": "keyword"})
    assert response.status_code == 200
    results = response.context_data["results"]
    assert {row.title for row in results} == {"Fresh bread and soft cheese for lunch", "The bakery sells rye bread on Sundays"}
    assert all(row.score is None and row.text_rank > 0 for row in results)


@pytest.mark.parametrize("page", ["0", "-1", "abc", "99", "1e9", ""])
def test_a_page_number_out_of_range_shows_the_nearest_page(notes, page):
    response = get({"paginate_by": 3, "max_results": 7}, {"q": "music", "page": page})
    assert response.status_code == 200
    assert response.context_data["page_obj"].number in (1, 3)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"q": "x" * 1001}, "longer than 1000 characters"),
        ({"q": "\x00\x01\x1f"}, "non-empty query"),
        ({"q": "rain", "mode": "nonsense"}, "Select a valid choice"),
        ({"q": "rain", "id": "not a number"}, "Invalid filter"),
    ],
    ids=["too-long", "control-characters", "unknown-mode", "bad-filter-value"],
)
def test_refused_input_is_a_message_and_a_400(notes, params, message):
    response = get({"filter_fields": ["id", "category"]}, params)
    assert response.status_code == 400
    assert message in response.context_data["error"]
    assert response.context_data["results"] == []
    assert message.encode() in response.content


def test_a_visitors_control_characters_become_spaces(notes):
    response = get({}, {"q": "rain\x00on\tthe\ncoast"})
    assert response.status_code == 200
    assert response.context_data["query"] == "rain on the coast"


def test_filters_apply_before_the_ranking(notes):
    query = "something to eat"
    expected = pks(Note.objects.filter(category="food").semantic_search(query, k=10))
    response = get({"filter_fields": ["category"]}, {"q": query, "category": "food"})
    assert response.status_code == 200
    assert pks(response.context_data["results"]) == expected and len(expected) == 3
    assert b'name="category"' in response.content


def test_anonymous_visitors_are_rate_limited_and_signed_in_users_are_not(notes):
    request_factory = RequestFactory()
    address = f"10.250.{next(_addresses) % 250}.9"
    view = SemanticSearchView.as_view(model=Note, collapse=None, diversity=None, rate="2/m")

    def search(user):
        request = request_factory.get("/search/", {"q": "rain"}, REMOTE_ADDR=address)
        request.user = user
        return view(request).render()

    statuses = [search(AnonymousUser()).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    editor = User.objects.create_user("editor-rate-limit")
    assert search(editor).status_code == 200
    assert b"Too many searches" in search(AnonymousUser()).content


def test_snippets_mark_the_query_words_and_escape_the_text():
    texts = [
        'Phones <img src=x onerror="alert(1)"> sold & shipped; the phone market grew',
        f"No match here, and a forged {START}mark{STOP} that must stay plain text",
        "",
    ]
    snippets = highlight(texts, "phone <script>")
    assert len(snippets) == 3
    assert "<mark>Phones</mark>" in snippets[0] and "<mark>phone</mark>" in snippets[0]  # stemmed
    assert "<img" not in snippets[0] and "&amp;" in snippets[0]
    assert "<mark>" not in snippets[1] and "forged mark that" in snippets[1]
    assert snippets[2] == ""
    # Only <mark> elements, every one closed.
    for snippet in snippets:
        assert set(re.findall(r"</?(\w+)", snippet)) <= {"mark"}
        assert snippet.count("<mark>") == snippet.count("</mark>")
    assert highlight([], "anything") == []


def test_a_chunked_rows_snippet_comes_from_its_best_passage():
    filler = "The committee met again on Tuesday to discuss the budget and the schedule for next year. " * 3
    LongNote.objects.create(title="a long note", body=f"{filler} The violins carried the slow movement. {filler}")
    LongNote.objects.create(title="another", body=filler)
    embed_stale_rows(LongNote._meta.get_field("embedding"), time_budget=120)
    response = get({"model": LongNote}, {"q": "violins slow movement", "mode": "semantic"})
    assert response.status_code == 200
    results = response.context_data["results"]
    assert results
    for row in results:
        assert row.best_chunk is not None
        passage = " ".join(row.best_chunk.text.split())
        for fragment in strip_tags(row.snippet).split(" … "):
            assert " ".join(fragment.split()) in passage


def test_the_page_renders_results_escaped_with_their_snippets(notes):
    Note.objects.filter(pk=notes[0].pk).update(title='<img src=x onerror="alert(1)"> rain & <script>alert(2)</script>')
    embed_stale_rows(Note._meta.get_field("embedding"), time_budget=60)
    html = get({}, {"q": "rain", "mode": "hybrid"}).content.decode()
    assert "<mark>rain</mark> &amp;" in html
    assert "<img" not in html and "<script>alert" not in html


def test_similar_items_are_the_orm_neighbours_and_cached(notes, django_assert_num_queries):
    target = notes.get(title="The team won the final after extra time")
    expected = pks(Note.objects.similar_to(target, k=4))
    embedding_cache.delete_key(f"{SIMILAR_PREFIX}testapp.note.embedding:{target.pk}:{target.embedding_vector_hash}:tiny:4")
    assert pks(similar_items(target, k=4)) == expected
    with django_assert_num_queries(1):  # the rows; the neighbours come from the cache
        assert pks(similar_items(target, k=4)) == expected
    rendered = Template("{% load semantic %}{% similar_items note k=4 as items %}{% for i in items %}[{{ i.pk }}]{% endfor %}").render(
        Context({"note": target})
    )
    assert rendered == "".join(f"[{pk}]" for pk in expected)


def test_similar_items_ignore_a_hostile_cached_value(notes):
    target = notes.get(title="The captain lifted the trophy")
    expected = pks(Note.objects.similar_to(target, k=3))
    key = f"{SIMILAR_PREFIX}testapp.note.embedding:{target.pk}:{target.embedding_vector_hash}:tiny:3"
    for planted in ({"pks": "DROP"}, {"pks": [{"a": 1}]}, {"other": 1}, {"pks": [True]}):
        embedding_cache.set_record(key, planted, 60)
        assert pks(similar_items(target, k=3)) == expected


def test_similar_items_of_a_row_without_a_vector_is_empty(notes):
    unembedded = Note.objects.create(title="Not embedded yet")
    assert similar_items(unembedded) == []


def test_the_snippet_tag_marks_words_of_any_row(notes):
    row = notes.get(title="Storms and heavy rain hit the coast")
    rendered = Template("{% load semantic %}{% snippet row q %}").render(Context({"row": row, "q": "storm"}))
    assert "<mark>Storms</mark>" in rendered


def test_several_models_are_one_ranking_with_snippets(notes):
    LongNote.objects.create(title="a long note", body="The violins carried the slow movement of the symphony. " * 3)
    embed_stale_rows(LongNote._meta.get_field("embedding"), time_budget=120)
    query = "violins and a symphony"
    expected = [(type(row), row.pk) for row in semantic.search(query, models=[Note, LongNote], k=10)]
    response = get({"model": None, "models": [Note, LongNote]}, {"q": query})
    assert response.status_code == 200
    results = response.context_data["results"]
    assert [(type(row), row.pk) for row in results] == expected
    assert {type(row) for row in results} == {Note, LongNote}
    assert all("<mark>" in row.snippet for row in results if "violin" in strip_tags(row.snippet).lower())
    assert response.context_data["form"].fields["mode"].choices == [("semantic", "Meaning")]


def test_a_request_without_an_address_is_counted_not_an_error(notes):
    request = RequestFactory().get("/search/", {"q": "rain"})
    del request.META["REMOTE_ADDR"]  # WSGI does not require it
    request.user = AnonymousUser()
    response = SemanticSearchView.as_view(model=Note, collapse=None, diversity=None, rate="1000/m")(request).render()
    assert response.status_code == 200 and response.context_data["results"]
