"""
Search by chunk at a size where the index path matters: each row once, ranked
by its best chunk, checked against a numpy oracle over the stored chunk
vectors, through the chunk index and exactly, unfiltered and filtered.

The invariant: a search by chunk returns the rows whose best chunk is
nearest, each once, min(k, rows that pass the filters) of them, with the
best chunk fetched in the same statement.
"""

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from semantic.retrieval.sql import SearchQuery
from tests.conftest import store_as_fresh, store_chunks
from tests.searchapp.models import ChunkedPassage

ROWS = 2000
CHUNKS = 4
BUCKETS = 100
DIMENSIONS = 32
K = 10


def unit(vectors):
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def make_corpus(seed=11):
    """Row centres around 40 clusters; each row's chunks scattered around its centre."""
    rng = np.random.default_rng(seed)
    clusters = rng.normal(size=(40, DIMENSIONS))
    centres = clusters[rng.integers(40, size=ROWS)] + 0.5 * rng.normal(size=(ROWS, DIMENSIONS))
    chunks = unit(centres[:, None, :] + 0.6 * rng.normal(size=(ROWS, CHUNKS, DIMENSIONS)))
    return chunks


@pytest.fixture(scope="module")
def corpus(django_db_setup, django_db_blocker):
    chunk_vectors = make_corpus()
    with django_db_blocker.unblock():
        rows = ChunkedPassage.objects.bulk_create(
            [ChunkedPassage(text=f"passage {i}", bucket=i % BUCKETS) for i in range(ROWS)], batch_size=2000
        )
        store_as_fresh(rows, unit(chunk_vectors.mean(axis=1)))
        store_chunks(rows, chunk_vectors)
        yield [row.pk for row in rows], chunk_vectors
        ChunkedPassage.objects.all().delete()


def best_chunk_oracle(query, ids, chunk_vectors, k, keep=None):
    """Top-k (pk, best chunk index) by exact cosine distance of each row's best chunk."""
    distances = 1.0 - chunk_vectors.astype(np.float64) @ query.astype(np.float64)
    best_index = distances.argmin(axis=1)
    best = distances.min(axis=1)
    order = [i for i in np.argsort(best, kind="stable") if keep is None or keep[i]]
    return [(ids[i], int(best_index[i])) for i in order[:k]], best


QUERIES = unit(np.random.default_rng(99).normal(size=(12, DIMENSIONS)) + make_corpus()[:12, 0, :] * 3)


@pytest.mark.django_db
@pytest.mark.parametrize("exact", [True, False, None])
@pytest.mark.parametrize("kept_buckets", [None, 50, 10, 1])
def test_each_row_once_ranked_by_its_best_chunk_at_any_selectivity(corpus, exact, kept_buckets):
    ids, chunk_vectors = corpus
    keep = None if kept_buckets is None else np.arange(ROWS) % BUCKETS < kept_buckets
    found, total = 0, 0
    for query in QUERIES:
        queryset = ChunkedPassage.objects.all()
        if kept_buckets is not None:
            queryset = queryset.filter(bucket__lt=kept_buckets)
        rows = list(queryset.nearest(query, k=K, exact=exact))
        expected, best = best_chunk_oracle(query, ids, chunk_vectors, K, keep)
        pks = [row.pk for row in rows]
        assert len(pks) == len(set(pks)) == min(K, ROWS if keep is None else int(keep.sum()))
        if keep is not None:
            assert all(row.bucket < kept_buckets for row in rows)
        distances = [row.distance for row in rows]
        assert distances == sorted(distances)
        for row in rows:
            position = ids.index(row.pk)
            # The distance is the row's best chunk's, and that chunk comes with the row.
            assert row.distance == pytest.approx(best[position], abs=1e-5)
            assert row.best_chunk.owner_id == row.pk and row.best_chunk.pk == row.best_chunk_id
            assert row.best_chunk.text == f"{row.pk}#{row.best_chunk.index}"
            assert row.score == pytest.approx(1 - row.distance)
        if exact:
            assert pks == [pk for pk, _ in expected]
        found += len(set(pks) & {pk for pk, _ in expected})
        total += len(expected)
    assert found / total >= 0.95


@pytest.mark.django_db
def test_best_chunk_comes_in_the_same_statement(corpus):
    chunk_table = ChunkedPassage._meta.get_field("embedding").chunk_model._meta.db_table
    with CaptureQueriesContext(connection) as captured:
        rows = list(ChunkedPassage.objects.filter(bucket__lt=30).nearest(QUERIES[0], k=K, exact=False))
        texts = [row.best_chunk.text for row in rows]
    assert len(texts) == K
    assert sum(chunk_table in query["sql"] for query in captured.captured_queries) == 1


@pytest.mark.django_db
def test_rows_whose_chunks_crowd_the_scan_still_come_k_distinct(corpus):
    """Three rows with sixty chunks each next to the query fill the first k*5 chunk places: the search widens."""
    rng = np.random.default_rng(3)
    query = QUERIES[3]
    crowd = ChunkedPassage.objects.bulk_create([ChunkedPassage(text=f"crowd {i}", bucket=BUCKETS) for i in range(3)])
    crowd_chunks = unit(query + 0.01 * rng.normal(size=(3, 60, DIMENSIONS)))
    store_as_fresh(crowd, unit(crowd_chunks.mean(axis=1)))
    store_chunks(crowd, crowd_chunks)
    ids, chunk_vectors = corpus
    expected, _ = best_chunk_oracle(query, ids, chunk_vectors, K - 3)
    for exact in (True, False):
        rows = list(ChunkedPassage.objects.nearest(query, k=K, exact=exact))
        assert len({row.pk for row in rows}) == K
        assert {row.pk for row in rows[:3]} == {row.pk for row in crowd}
        if exact:
            assert [row.pk for row in rows[3:]] == [pk for pk, _ in expected]


@pytest.mark.django_db
def test_automatic_choice_weighs_the_chunks_an_exact_scan_compares(corpus, settings):
    # 2,000 rows but 8,000 chunks: above a threshold of 5,000 the index is used.
    settings.SEMANTIC = {**settings.SEMANTIC, "EXACT_SEARCH_THRESHOLD": 5000}
    assert "enable_indexscan" not in ChunkedPassage.objects.nearest(QUERIES[1], k=K).search_settings()
    # A 10% filter leaves ~800 chunks: exact.
    filtered = ChunkedPassage.objects.filter(bucket__lt=10).nearest(QUERIES[1], k=K)
    assert filtered.search_settings() == {"enable_indexscan": "off"}
    # Ranked by the row vectors, 2,000 rows: exact.
    by_row = ChunkedPassage.objects.nearest(QUERIES[1], k=K, by_chunk=False)
    assert by_row.search_settings() == {"enable_indexscan": "off"}


@pytest.mark.django_db
def test_filters_after_a_plain_search_are_applied_to_it(corpus):
    ids, chunk_vectors = corpus
    query = QUERIES[2]
    search = ChunkedPassage.objects.nearest(query, exact=True)
    plain = search[:K]
    assert plain.query.plain_key("default", True, False) is not None
    list(plain)  # its SQL is now cached
    filtered = search.filter(bucket__lt=5)[:K]
    assert isinstance(filtered.query, SearchQuery)
    assert filtered.query.plain_key("default", True, False) is None
    keep = np.arange(ROWS) % BUCKETS < 5
    expected, _ = best_chunk_oracle(query, ids, chunk_vectors, K, keep)
    assert [row.pk for row in filtered] == [pk for pk, _ in expected]
    # values() of the same search, from the cached shape and not.
    assert [v["pk"] for v in plain.values("pk", "distance")] == [row.pk for row in plain]
    assert filtered.count() == K and search.filter(bucket__gte=BUCKETS + 1).count() == 0


@pytest.mark.django_db
def test_a_locking_search_by_chunk_locks_its_rows_only(corpus):
    """select_for_update() locks the rows returned, not every row the chunk scan's filter subquery reads."""
    import psycopg

    from tests.conftest import other_connection

    ids, _ = corpus
    rows = list(ChunkedPassage.objects.select_for_update().nearest(QUERIES[4], k=K, exact=True))
    assert len({row.pk for row in rows}) == K
    returned = {row.pk for row in rows}
    other = next(pk for pk in ids if pk not in returned)
    with other_connection() as elsewhere:
        table = ChunkedPassage._meta.db_table
        elsewhere.execute(f'SELECT id FROM "{table}" WHERE id = %s FOR UPDATE NOWAIT', [other])
        with pytest.raises(psycopg.errors.LockNotAvailable):
            elsewhere.execute(f'SELECT id FROM "{table}" WHERE id = %s FOR UPDATE NOWAIT', [rows[0].pk])


@pytest.mark.django_db
def test_chunk_vectors_stay_in_the_row(corpus):
    """The chunk table keeps its vectors inline (STORAGE MAIN), not in TOAST, however its migration created it."""
    chunk_table = ChunkedPassage._meta.get_field("embedding").chunk_model._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'embedding'", [chunk_table]
        )
        assert cursor.fetchone()[0] == "m"
        # Nothing of the chunks' vectors went to the TOAST table.
        cursor.execute(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = %s::regclass", [chunk_table]
        )
        assert cursor.fetchone()[0] == 0


@pytest.mark.django_db
def test_cached_plain_searches_of_values_give_each_query_its_own_rows(corpus):
    ids, chunk_vectors = corpus
    for query in QUERIES[5:8]:
        search = ChunkedPassage.objects.nearest(query, k=K, exact=True).values_list("pk", "distance")
        assert search.query.plain_key("default", True, False) is not None
        expected, best = best_chunk_oracle(query, ids, chunk_vectors, K)
        rows = list(search)
        assert [pk for pk, _ in rows] == [pk for pk, _ in expected]
        assert [distance for _, distance in rows] == pytest.approx([best[ids.index(pk)] for pk, _ in expected], abs=1e-5)


@pytest.mark.django_db
@pytest.mark.parametrize("by_chunk", [True, False])
@pytest.mark.parametrize("exact", [True, False])
def test_a_filter_across_a_to_many_relation_returns_each_row_once(corpus, by_chunk, exact):
    """Every row has 4 chunks that match ``index__gte=0``: joined, each row came up to 4 times."""
    query = QUERIES[4]
    across_chunks = ChunkedPassage.objects.filter(embedding_chunks__index__gte=0, bucket__lt=50)
    found = list(across_chunks.nearest(query, k=K, exact=exact, by_chunk=by_chunk))
    same = list(ChunkedPassage.objects.filter(bucket__lt=50).nearest(query, k=K, exact=exact, by_chunk=by_chunk))
    assert len({row.pk for row in found}) == len(found) == K
    if exact:
        assert [row.pk for row in found] == [row.pk for row in same]
        assert [row.distance for row in found] == pytest.approx([row.distance for row in same])
