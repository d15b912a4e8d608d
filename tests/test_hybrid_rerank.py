"""
Two-stage and hybrid search through the ORM, checked against independent
computations: the cross-encoder's own predict() order over the same
candidates, and reciprocal rank fusion computed in Python from the two
rankings fetched separately.
"""

import pytest
from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from semantic.hashing import clean_text
from tests.conftest import wait_until
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True)

NOTES = [
    ("Zeppelin flights return to the city", "Airships carry tourists over the bay.", "even"),
    ("Bakery wins bread award", "Sourdough loaves sell out by nine.", "odd"),
    ("River flood warning", "Residents near the river should prepare sandbags.", "even"),
    ("New cycle lanes approved", "The council approved lanes on the high street.", "odd"),
    ("Heatwave expected", "Temperatures may reach record highs this weekend.", "even"),
    ("Football club wins the cup", "Fans celebrated in the square until midnight.", "odd"),
    ("Library opens on Sundays", "Longer hours for students during exams.", "even"),
    ("Zeppelin museum reopens", "The history of airships, from Friedrichshafen to today.", "odd"),
    ("Train timetable changes", "Fewer trains on Sundays from December.", "even"),
    ("Solar panels on schools", "Every school roof will carry solar panels.", "odd"),
    ("Bus strike called off", "Drivers accepted the new pay offer.", "even"),
    ("Market hall restored", "The Victorian market hall reopens in spring.", "odd"),
]


@pytest.fixture
def notes(celery_worker):
    with transaction.atomic():
        rows = [Note.objects.create(title=t, body=b, category=c) for t, b, c in NOTES]
    wait_until(lambda: not Note.objects.filter(embedding=None).exists(), message="notes embedded")
    return rows


@pytest.fixture
def reranker_configured(settings, cross_encoder_dir):
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": str(cross_encoder_dir)}
    return cross_encoder_dir


def test_rerank_orders_candidates_as_the_cross_encoder_does(notes, reranker_configured):
    from sentence_transformers import CrossEncoder

    query = "airship history"
    candidates = list(Note.objects.semantic_search(query, k=8, exact=True))
    oracle = CrossEncoder(str(reranker_configured), device="cpu")
    field = Note._meta.get_field("embedding")
    scores = oracle.predict([(query, clean_text(field.build_text(n))) for n in candidates], show_progress_bar=False)
    expected = [candidates[i].pk for i in sorted(range(8), key=lambda i: -scores[i])[:3]]

    results = list(Note.objects.semantic_search(query, k=3, rerank=True, candidates=8, exact=True))
    assert [r.pk for r in results] == expected
    by_pk = {c.pk: c for c in candidates}
    for result in results:
        assert result.rerank_score == pytest.approx(float(scores[[c.pk for c in candidates].index(result.pk)]), abs=1e-5)
        # The first-stage scores stay available.
        assert result.distance == pytest.approx(by_pk[result.pk].distance, abs=1e-6)
        assert result.score == pytest.approx(by_pk[result.pk].score, abs=1e-6)


def test_rerank_keeps_filters_and_defaults_k(notes, reranker_configured):
    results = list(Note.objects.filter(category="odd").semantic_search("museum", rerank=True, exact=True))
    assert len(results) == 6
    assert all(r.category == "odd" for r in results)
    assert [r.rerank_score for r in results] == sorted((r.rerank_score for r in results), reverse=True)


def test_rerank_without_a_reranker_is_a_clear_error(notes):
    with pytest.raises(ImproperlyConfigured, match="RERANKER"):
        Note.objects.semantic_search("museum", rerank=True)


def python_fusion(query, weights=(1.0, 1.0), c=60, queryset=None):
    """RRF over the two rankings fetched with separate ORM queries."""
    queryset = queryset if queryset is not None else Note.objects.all()
    by_vector = [n.pk for n in queryset.semantic_search(query, exact=True)]
    document = SearchVector("title", "body", config="english")
    search = SearchQuery(query, search_type="websearch", config="english")
    by_text = list(
        queryset.annotate(d=document)
        .filter(d=search)
        .annotate(rank=SearchRank(document, search, cover_density=True))
        .order_by("-rank", "pk")
        .values_list("pk", flat=True)
    )
    fused = {}
    for rank, pk in enumerate(by_vector, 1):
        fused[pk] = fused.get(pk, 0) + weights[0] / (c + rank)
    for rank, pk in enumerate(by_text, 1):
        fused[pk] = fused.get(pk, 0) + weights[1] / (c + rank)
    return fused, by_vector, by_text


def test_hybrid_equals_reciprocal_rank_fusion_of_both_rankings(notes):
    query = "zeppelin airships"
    fused, by_vector, by_text = python_fusion(query)
    assert len(by_text) == 2  # the keyword side really contributes
    results = list(Note.objects.hybrid_search(query, k=5, exact=True))
    assert [r.hybrid_score for r in results] == pytest.approx(sorted(fused.values(), reverse=True)[:5], abs=1e-9)
    assert [r.pk for r in results] == sorted(fused, key=lambda pk: -fused[pk])[:5]
    for result in results:
        assert result.vector_rank == by_vector.index(result.pk) + 1
        assert result.text_rank == (by_text.index(result.pk) + 1 if result.pk in by_text else None)
    # Both keyword matches rank first: each is in both rankings.
    assert {r.pk for r in results[:2]} == set(by_text)


def test_hybrid_weights_and_filters(notes):
    query = "zeppelin"
    only_text = list(Note.objects.hybrid_search(query, k=3, weights=(0.0, 1.0), exact=True))
    _, _, by_text = python_fusion(query)
    assert [r.pk for r in only_text[: len(by_text)]] == by_text
    filtered = list(Note.objects.filter(category="even").hybrid_search(query, k=4, exact=True))
    assert len(filtered) == 4 and all(r.category == "even" for r in filtered)
    fused, _, _ = python_fusion(query, queryset=Note.objects.filter(category="even"))
    assert [r.pk for r in filtered] == sorted(fused, key=lambda pk: -fused[pk])[:4]


def test_hybrid_with_no_keyword_match_is_the_vector_ranking(notes):
    query = "the of and"  # stop words only: no text match
    results = list(Note.objects.hybrid_search(query, k=4, exact=True))
    assert [r.pk for r in results] == [n.pk for n in Note.objects.semantic_search(query, k=4, exact=True)]
    assert all(r.text_rank is None for r in results)


@pytest.mark.parametrize("query", ["'; DROP TABLE testapp_note; --", 'a "quoted -phrase" or', "x" * 1000, "nul\x00 and bell\x07"])
def test_hybrid_odd_queries(notes, query):
    assert len(list(Note.objects.hybrid_search(query, k=3, exact=True))) == 3


def test_hybrid_refuses_a_query_over_the_limit(notes):
    with pytest.raises(ValueError, match="longer than 1000 characters"):
        Note.objects.hybrid_search("x" * 1001, k=3)
