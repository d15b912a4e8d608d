"""
semantic.search(): one ranking across models, checked against each model's
own semantic_search. Fields on one encoder configuration are merged by
distance in one statement; other groups are fused by rank.
"""

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test.utils import CaptureQueriesContext

import semantic
from semantic.conf import semantic_settings
from semantic.worker import embed_stale_rows
from tests.testapp.models import Draft, LongNote, Note, TruncatedNote

# Not transactional: the rows stay invisible to the in-thread worker other
# modules start, so only this module embeds them.
pytestmark = pytest.mark.django_db

SENTENCES = [
    "Rain and wind are expected tomorrow along the coast",
    "The team won the final after extra time",
    "Fresh bread and soft cheese make a simple lunch",
    "The night train crosses the mountains before dawn",
    "The orchestra played the symphony twice",
    "Shares fell sharply after the profit warning",
    "The new phone sold a million units in a week",
    "Snow closed the mountain pass for two days",
]
FILLER = "The committee met on Tuesday to talk about the budget and the schedule."


@pytest.fixture
def rows():
    for i, sentence in enumerate(SENTENCES):
        LongNote.objects.create(title=f"long {i}", body=f"{FILLER} {sentence}. {FILLER}")
        TruncatedNote.objects.create(body=f"{SENTENCES[-1 - i]} and more")
        Draft.objects.create(title=f"draft {i}", body=f"{SENTENCES[(i + 3) % len(SENTENCES)]}. {FILLER}")
        Note.objects.create(title=sentence, category="odd" if i % 2 else "even")
    for model in (LongNote, TruncatedNote, Draft, Note):
        embed_stale_rows(model._meta.get_field("embedding"), time_budget=120)


def own_ranking(queryset, query, k):
    return [(queryset.model._meta.label, row.pk, row.distance) for row in queryset.semantic_search(query, k=k, exact=True)]


def labelled(results):
    return [(row._meta.label, row.pk) for row in results]


@pytest.mark.parametrize("query", ["snow in the mountains", "bread for lunch", "a phone"])
def test_fields_on_one_encoder_are_merged_by_distance_in_one_statement(rows, query):
    querysets = [LongNote.objects.all(), TruncatedNote.objects.all(), Draft.objects.all()]
    expected = sorted(sum((own_ranking(qs, query, 6) for qs in querysets), []), key=lambda hit: hit[2])[:6]
    with CaptureQueriesContext(connection) as queries:
        results = semantic.search(query, models=[LongNote, TruncatedNote, Draft], k=6, exact=True)
    assert labelled(results) == [(label, pk) for label, pk, _ in expected]
    assert [row.distance for row in results] == pytest.approx([distance for _, _, distance in expected], abs=1e-5)
    assert [row.search_score for row in results] == [row.score for row in results]
    assert [row.score for row in results] == sorted((row.score for row in results), reverse=True)
    # Every vector comparison in one statement.
    assert len([q for q in queries.captured_queries if "<=>" in q["sql"]]) == 1
    for row in results:
        if isinstance(row, TruncatedNote):
            assert row.best_chunk is None
        else:
            assert row.best_chunk is not None and row.best_chunk.owner_id == row.pk


def test_the_index_path_returns_the_same_rows(rows):
    query = "weather on the coast"
    exact = labelled(semantic.search(query, models=[LongNote, TruncatedNote, Draft], k=5, exact=True))
    default = labelled(semantic.search(query, models=[LongNote, TruncatedNote, Draft], k=5))
    assert default == exact


def test_per_model_filters_are_querysets(rows):
    query = "a train at night"
    drafts = Draft.objects.filter(title__in=["draft 1", "draft 2"])
    results = semantic.search(query, models=[drafts, TruncatedNote], k=20, exact=True)
    assert {row.pk for row in results if isinstance(row, Draft)} == set(drafts.values_list("pk", flat=True))
    assert len(results) == 2 + TruncatedNote.objects.count()


def test_fields_on_different_encoders_are_fused_by_rank(rows):
    query = "shares and profits"
    notes = own_ranking(Note.objects.all(), query, 4)
    long_notes = own_ranking(LongNote.objects.all(), query, 4)
    results = semantic.search(query, models=[Note, LongNote], k=6, exact=True)
    # Each group's order is kept, and equal ranks alternate (ties: the order of models).
    interleaved = [hit for pair in zip(notes, long_notes) for hit in pair][:6]
    assert labelled(results) == [(label, pk) for label, pk, _ in interleaved]
    c = semantic_settings.HYBRID_RRF_K
    assert [row.search_score for row in results] == pytest.approx([1 / (c + 1)] * 2 + [1 / (c + 2)] * 2 + [1 / (c + 3)] * 2)
    assert all(row.score is not None for row in results)


def test_min_score_and_empty_querysets(rows):
    assert semantic.search("anything", models=[Note.objects.none()], k=5) == []
    everything = semantic.search("snow", models=[LongNote, TruncatedNote], k=50, exact=True)
    floor = everything[3].score
    kept = semantic.search("snow", models=[LongNote, TruncatedNote], k=50, min_score=floor, exact=True)
    assert labelled(kept) == labelled(everything[:4])


@pytest.mark.parametrize(
    "models, error, match",
    [
        ([], ValueError, "non-empty list"),
        (Note, ValueError, "non-empty list"),
        (["Note"], ValueError, "model class or a QuerySet"),
        ([Note, Note.objects.all()], ValueError, "named twice"),
        ([Note, (LongNote, "no_such_field")], ImproperlyConfigured, "no embedding field"),
    ],
)
def test_bad_models_are_clear_errors(models, error, match):
    with pytest.raises(error, match=match):
        semantic.search("query", models=models)


def test_the_query_and_k_are_checked_like_semantic_search():
    with pytest.raises(ValueError, match="non-empty query"):
        semantic.search("\x00 ", models=[Note])
    with pytest.raises(ValueError, match="k must be at most"):
        semantic.search("query", models=[Note], k=10_000)
