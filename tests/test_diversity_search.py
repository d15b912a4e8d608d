"""
``collapse=`` and ``diversity=`` through the ORM, on the real PostgreSQL.

Rows carry vectors written directly (fresh hashes, tests.conftest.store_as_fresh)
around a known query direction, so which rows are copies of which is known;
expected results come from the plain search's own candidates, run through a
reference collapse / MMR written here.
"""

import math

import numpy as np
import pytest
from django.db import connection

from semantic.retrieval import estimates
from semantic.retrieval.query_vectors import embed_query
from tests.conftest import store_as_fresh, store_chunks
from tests.searchapp.models import ChunkedPassage, HalfPassage, Passage
from tests.test_diversity import reference_cosine, reference_mmr

pytestmark = pytest.mark.django_db

DIMENSIONS = 32


@pytest.fixture(autouse=True)
def fresh_table_statistics():
    """Searches cache table row counts per process; the rows here roll back with each test, so the counts must go too."""
    estimates.forget_table_statistics()
    yield
    estimates.forget_table_statistics()


def unit(vector):
    vector = np.asarray(vector, dtype=np.float64)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def axis(i, scale=1.0):
    vector = np.zeros(DIMENSIONS)
    vector[i] = scale
    return vector


QUERY = unit(axis(0))
# Three identical vectors (one story filed three times) closest to the query,
# a near copy of them (cosine 0.9998), then ten distinct stories on the same
# subject (cosine 0.75-0.86 with each other, 0.85-0.93 with the copies; each
# a little farther from the query than the one before, so no two tie), then
# noise.
COPY = unit(axis(0) + axis(1, 0.1))
NEAR_COPY = unit(axis(0) + axis(1, 0.1) + axis(2, 0.02))
DISTINCT = [unit(axis(0) + axis(3 + j, 0.4 + 0.03 * j)) for j in range(10)]


def corpus(model=Passage, noise=20):
    """Rows in the order: 3 copies, the near copy, 10 distinct, ``noise`` random; each row's bucket is its position."""
    rng = np.random.default_rng(3)
    vectors = [COPY, COPY, COPY, NEAR_COPY, *DISTINCT, *(unit(v) for v in rng.normal(size=(noise, DIMENSIONS)))]
    rows = [model(text=f"story {i}", bucket=i) for i in range(len(vectors))]
    model.objects.bulk_create(rows)
    if model is ChunkedPassage:
        return rows, vectors
    store_as_fresh(rows, vectors)
    connection.cursor().execute(f"ANALYZE {model._meta.db_table}")
    return rows, vectors


def reference_collapse(vectors, threshold):
    kept = []
    for i, vector in enumerate(vectors):
        if all(reference_cosine(vector, vectors[j]) < threshold - 1e-6 for j in kept):
            kept.append(i)
    return kept


def vectors_by_pk(rows, vectors):
    return {row.pk: vector for row, vector in zip(rows, vectors)}


def test_collapse_keeps_one_of_identical_rows():
    rows, vectors = corpus()
    copies = {row.pk for row in rows[:4]}
    plain = list(Passage.objects.nearest(QUERY, k=5))
    assert len({r.pk for r in plain} & copies) == 4  # without collapse the copies fill the top places

    results = list(Passage.objects.nearest(QUERY, k=5, collapse=True))
    assert len(results) == 5
    assert results[0].pk == plain[0].pk  # the best-ranked copy stays
    assert len({r.pk for r in results} & copies) == 1
    assert {r.pk for r in results[1:]} <= {row.pk for row in rows[4:14]}
    by_pk = vectors_by_pk(rows, vectors)
    for a in results:
        for b in results:
            if a.pk != b.pk:
                assert reference_cosine(by_pk[a.pk], by_pk[b.pk]) < 0.95


def test_collapse_threshold_one_drops_exact_copies_only():
    rows, _ = corpus()
    results = list(Passage.objects.nearest(QUERY, k=5, collapse=1.0))
    pks = [r.pk for r in results]
    assert len(set(pks) & {row.pk for row in rows[:3]}) == 1
    assert rows[3].pk in pks  # the near copy (cosine 0.9998) is not an exact one


def test_collapse_annotates_the_search_scores_and_keeps_its_order():
    rows, vectors = corpus()
    plain = {r.pk: r for r in Passage.objects.nearest(QUERY, k=50)}
    results = Passage.objects.nearest(QUERY, k=8, collapse=True)
    assert len(results) == 8
    for result in results:
        assert result.distance == pytest.approx(plain[result.pk].distance, abs=1e-6)
        assert result.score == pytest.approx(1 - result.distance, abs=1e-6)
    assert [r.distance for r in results] == sorted(r.distance for r in results)
    # The annotations live in the SQL too: the result can be filtered and re-read.
    again = list(results.filter(score__gte=0).values_list("pk", "score"))
    assert [pk for pk, _ in again] == [r.pk for r in results]
    assert [score for _, score in again] == pytest.approx([r.score for r in results], abs=1e-6)
    assert not hasattr(results[0], "_row_vector")


def test_filters_compose_before_and_after():
    rows, _ = corpus()
    # The first copy filtered out before the search: another copy stands for them.
    results = list(Passage.objects.exclude(bucket=0).nearest(QUERY, k=5, collapse=True))
    assert rows[0].pk not in {r.pk for r in results}
    assert len({r.pk for r in results} & {row.pk for row in rows[1:4]}) == 1
    assert all(r.bucket != 0 for r in results)
    # Only noise rows: nothing to collapse, the plain ranking.
    noise = Passage.objects.filter(bucket__gte=14)
    assert [r.pk for r in noise.nearest(QUERY, k=6, collapse=True)] == [r.pk for r in noise.nearest(QUERY, k=6)]
    # After: the pinned result filters like any QuerySet.
    after = Passage.objects.nearest(QUERY, k=6, collapse=True).filter(bucket__lt=6)
    assert sorted(r.bucket for r in after) == [0, 4, 5]


def test_k_rows_when_enough_distinct_candidates_and_fewer_otherwise(settings):
    rows, _ = corpus(noise=0)  # 14 rows: 11 distinct at 0.95
    assert len(Passage.objects.nearest(QUERY, k=10, collapse=True)) == 10
    assert len(Passage.objects.nearest(QUERY, collapse=True)) == 10  # k defaults to 10
    assert len(Passage.objects.nearest(QUERY, k=14, collapse=True)) == 11
    assert len(Passage.objects.nearest(QUERY, k=14)) == 14
    # The pool: only the top DIVERSITY_CANDIDATES (at least k) rows are candidates.
    settings.SEMANTIC = {**settings.SEMANTIC, "DIVERSITY_CANDIDATES": 5}
    assert len(Passage.objects.nearest(QUERY, k=3, collapse=True)) == 2
    assert Passage.objects.filter(bucket=-1).nearest(QUERY, k=3, collapse=True).count() == 0


def test_diversity_is_mmr_over_the_plain_candidates():
    rows, vectors = corpus()
    by_pk = vectors_by_pk(rows, vectors)
    candidates = list(Passage.objects.nearest(QUERY, k=50))
    for diversity in (0.2, 0.6, 1.0):
        expected = reference_mmr([by_pk[c.pk] for c in candidates], [c.score for c in candidates], 6, diversity)
        results = list(Passage.objects.nearest(QUERY, k=6, diversity=diversity))
        assert [r.pk for r in results] == [candidates[i].pk for i in expected], diversity
    # Among the copies and the stories alone (relevance rescaled over them:
    # copies 1, the best story 0.59, similar to the copies at 0.92), the
    # second place goes to a story only once diversity outweighs that gap.
    stories = Passage.objects.filter(bucket__lt=14)
    assert stories.nearest(QUERY, k=2, diversity=0.5)[1].pk in {row.pk for row in rows[:4]}
    assert stories.nearest(QUERY, k=2, diversity=0.9)[1].pk in {row.pk for row in rows[4:14]}


def test_collapse_then_diversity_in_one_call():
    rows, vectors = corpus()
    by_pk = vectors_by_pk(rows, vectors)
    candidates = list(Passage.objects.nearest(QUERY, k=50))
    kept = [candidates[i] for i in reference_collapse([by_pk[c.pk] for c in candidates], 0.95)]
    expected = reference_mmr([by_pk[c.pk] for c in kept], [c.score for c in kept], 7, 0.5)
    results = Passage.objects.nearest(QUERY, k=7, collapse=True, diversity=0.5)
    assert [r.pk for r in results] == [kept[i].pk for i in expected]


def test_semantic_search_and_similar_to_take_them_too():
    field = Passage._meta.get_field("embedding")
    query_vector = embed_query(field, "lighthouse keeper")
    rows = [Passage(text=f"copy {i}", bucket=i) for i in range(3)] + [Passage(text="other", bucket=9)]
    Passage.objects.bulk_create(rows)
    other = unit(np.asarray(query_vector) + unit(axis(5)))
    store_as_fresh(rows, [query_vector, query_vector, query_vector, other])

    plain = list(Passage.objects.semantic_search("lighthouse keeper", k=4))
    assert [r.bucket for r in plain][-1] == 9
    results = list(Passage.objects.semantic_search("lighthouse keeper", k=4, collapse=True, candidates=10))
    assert [r.pk for r in results] == [plain[0].pk, rows[3].pk]
    assert results[0].score == pytest.approx(1.0, abs=1e-5)

    similar = list(Passage.objects.similar_to(rows[0], k=3, collapse=True))
    assert len(similar) == 2 and similar[1].pk == rows[3].pk
    assert similar[0].pk in {rows[1].pk, rows[2].pk}


def test_hybrid_search_collapses_its_fused_ranking():
    words = ["zeppelin museum reopens"] * 3 + [f"zeppelin flight {i}" for i in range(5)] + [f"bakery {i}" for i in range(5)]
    rows = [Passage(text=text, bucket=i) for i, text in enumerate(words)]
    Passage.objects.bulk_create(rows)
    rng = np.random.default_rng(11)
    query_vector = np.asarray(embed_query(Passage._meta.get_field("embedding"), "zeppelin museum"))
    vectors = [unit(query_vector)] * 3 + [unit(v) for v in rng.normal(size=(10, DIMENSIONS))]
    store_as_fresh(rows, vectors)
    by_pk = vectors_by_pk(rows, vectors)

    plain = list(Passage.objects.hybrid_search("zeppelin museum", k=50, exact=True))
    copies = {row.pk for row in rows[:3]}
    assert len({r.pk for r in plain[:3]} & copies) == 3  # words and vectors both put the copies first
    kept = [plain[i] for i in reference_collapse([by_pk[r.pk] for r in plain], 0.95)]
    results = list(Passage.objects.hybrid_search("zeppelin museum", k=5, collapse=True, exact=True))
    assert [r.pk for r in results] == [r.pk for r in kept[:5]]
    assert len({r.pk for r in results} & copies) == 1
    fused = {r.pk: r for r in plain}
    for result in results:
        for name in ("hybrid_score", "vector_rank", "text_rank", "distance", "score"):
            expected = getattr(fused[result.pk], name)
            assert getattr(result, name) == (pytest.approx(expected, abs=1e-9) if expected is not None else None)

    expected = reference_mmr([by_pk[r.pk] for r in plain], [r.hybrid_score for r in plain], 4, 0.5)
    diverse = Passage.objects.hybrid_search("zeppelin museum", k=4, diversity=0.5, exact=True)
    assert [r.pk for r in diverse] == [plain[i].pk for i in expected]


def test_rerank_then_collapse(settings, cross_encoder_dir):
    from semantic.rerank import get_reranker

    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": str(cross_encoder_dir)}
    rows, vectors = corpus(noise=6)
    by_pk = vectors_by_pk(rows, vectors)
    field = Passage._meta.get_field("embedding")
    candidates = list(Passage.objects.nearest(embed_query(field, "story"), k=20, exact=True))
    scores = get_reranker().score("story", [c.text for c in candidates])
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    reranked = [candidates[i] for i in order]
    kept = [reranked[i] for i in reference_collapse([by_pk[c.pk] for c in reranked], 0.95)]
    assert len(kept) == 17  # of the 4 copies, the one the cross-encoder ranks best

    results = list(Passage.objects.semantic_search("story", k=20, rerank=True, candidates=20, collapse=True, exact=True))
    assert [r.pk for r in results] == [c.pk for c in kept]
    assert [r.pk for r in Passage.objects.semantic_search("story", k=3, rerank=True, candidates=20, collapse=True)] == [
        c.pk for c in kept[:3]
    ]
    for result in results:
        i = [c.pk for c in candidates].index(result.pk)
        assert result.rerank_score == pytest.approx(float(scores[i]), abs=1e-5)
        assert result.distance == pytest.approx(candidates[i].distance, abs=1e-6)


def test_chunked_rows_are_collapsed_by_their_row_vectors():
    rows, vectors = corpus(ChunkedPassage, noise=4)
    # Ranked by chunks that differ, compared by row vectors that may not.
    store_as_fresh(rows, vectors)
    rng = np.random.default_rng(5)
    store_chunks(rows, [[unit(v + 0.05 * rng.normal(size=DIMENSIONS)) for _ in range(2)] for v in vectors])
    plain = list(ChunkedPassage.objects.nearest(QUERY, k=6))
    copies = {row.pk for row in rows[:4]}
    assert len({r.pk for r in plain} & copies) >= 2
    results = list(ChunkedPassage.objects.nearest(QUERY, k=6, collapse=True))
    assert len({r.pk for r in results} & copies) == 1
    assert all(r.best_chunk is not None and r.best_chunk.text.startswith(f"{r.pk}#") for r in results)


def test_halfvec_rows_are_read_in_their_own_binary_form():
    rows, vectors = corpus(HalfPassage)
    copies = {row.pk for row in rows[:4]}
    results = list(HalfPassage.objects.nearest(QUERY, k=5, collapse=True, diversity=0.3))
    assert len(results) == 5
    assert len({r.pk for r in results} & copies) == 1
    by_pk = vectors_by_pk(rows, [v.astype(np.float16) for v in vectors])
    candidates = list(HalfPassage.objects.nearest(QUERY, k=50))
    kept = [candidates[i] for i in reference_collapse([by_pk[c.pk] for c in candidates], 0.95)]
    expected = reference_mmr([by_pk[c.pk] for c in kept], [c.score for c in kept], 5, 0.3)
    assert [r.pk for r in results] == [kept[i].pk for i in expected]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"collapse": 1.5}, "collapse must be"),
        ({"collapse": -0.1}, "collapse must be"),
        ({"collapse": math.nan}, "collapse must be"),
        ({"collapse": "yes"}, "collapse must be"),
        ({"diversity": True}, "diversity must be"),
        ({"diversity": 2}, "diversity must be"),
        ({"diversity": -0.5}, "diversity must be"),
    ],
)
def test_bad_arguments_are_clear_errors_in_every_search(kwargs, message):
    row = Passage.objects.create(text="x", bucket=0)
    store_as_fresh([row], [QUERY])
    calls = [
        lambda: Passage.objects.nearest(QUERY, **kwargs),
        lambda: Passage.objects.semantic_search("x", **kwargs),
        lambda: Passage.objects.similar_to(row, **kwargs),
        lambda: Passage.objects.hybrid_search("x", **kwargs),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_values_querysets_are_refused_and_results_take_values():
    rows, _ = corpus()
    with pytest.raises(TypeError, match="values"):
        Passage.objects.values("pk").nearest(QUERY, k=3, collapse=True)
    result = Passage.objects.nearest(QUERY, k=3, collapse=True).values_list("bucket", flat=True)
    assert list(result)[0] in {0, 1, 2} and len(result) == 3
