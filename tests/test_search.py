"""Read path: semantic_search composes with ORM filters and orders by distance."""

import numpy as np
import pytest
from django.db import transaction

from semantic.retrieval.query_vectors import embed_query
from tests.conftest import wait_until
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True)

TITLES = [
    "Solar panels on every school roof",
    "Train timetable changes in December",
    "New bakery opens on the high street",
    "Flood defences strengthened along the river",
    "Library extends opening hours",
    "Council approves new cycle lanes",
    "Heatwave warning for the weekend",
    "Local football club wins the cup",
]


@pytest.fixture
def notes(celery_worker):
    with transaction.atomic():
        rows = [
            Note.objects.create(title=title, category="even" if i % 2 == 0 else "odd")
            for i, title in enumerate(TITLES)
        ]
    wait_until(lambda: not Note.objects.filter(embedding=None).exists(), message="notes embedded")
    return rows


def test_search_returns_rows_in_distance_order_with_scores(notes):
    results = list(Note.objects.semantic_search("weather forecast"))
    assert len(results) == len(TITLES)
    query = embed_query(Note._meta.get_field("embedding"), "weather forecast")
    expected = sorted(
        (1 - float(np.dot(query, n.embedding) / (np.linalg.norm(query) * np.linalg.norm(n.embedding))), n.pk)
        for n in Note.objects.all()
    )
    assert [r.pk for r in results] == [pk for _, pk in expected]
    for result, (distance, _) in zip(results, expected):
        assert result.distance == pytest.approx(distance, abs=1e-5)
        assert result.score == pytest.approx(1 - distance, abs=1e-5)


def test_filter_before_and_after_search(notes):
    before = list(Note.objects.filter(category="even").semantic_search("sport results"))
    after = list(Note.objects.semantic_search("sport results").filter(category="even"))
    assert [n.pk for n in before] == [n.pk for n in after]
    assert len(before) == 4 and all(n.category == "even" for n in before)
    distances = [n.distance for n in before]
    assert distances == sorted(distances)


def test_k_and_min_score(notes):
    top = Note.objects.semantic_search("river", k=3)
    assert len(top) == 3
    everything = list(Note.objects.semantic_search("river"))
    threshold = everything[2].score
    assert [n.pk for n in Note.objects.semantic_search("river", min_score=threshold)] == [n.pk for n in everything[:3]]


def test_rows_without_vectors_are_left_out(notes):
    Note.objects.filter(pk=notes[0].pk).update(embedding=None)
    assert notes[0].pk not in {n.pk for n in Note.objects.semantic_search("solar power")}


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query_is_a_clear_error(query):
    with pytest.raises(ValueError, match="non-empty query"):
        Note.objects.semantic_search(query)


@pytest.mark.parametrize("k", [0, -1, "10"])
def test_bad_k_is_a_clear_error(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        Note.objects.semantic_search("anything", k=k)
