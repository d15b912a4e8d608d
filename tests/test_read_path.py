"""
Read path against outside oracles: exact search equals
sentence_transformers.util.semantic_search, filtered index searches return k
rows at every selectivity, index settings stay inside their query.

The rows carry vectors written directly (with matching hashes, so they are
fresh): this module tests finding rows, not embedding them.
"""

import numpy as np
import pytest
import torch
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.db.models.expressions import RawSQL
from sentence_transformers import util

from semantic.retrieval.query_vectors import embed_query
from tests.conftest import store_as_fresh
from tests.searchapp.models import IpPassage, Passage

ROWS = 10_000
BUCKETS = 1000
DIMENSIONS = 32


def clustered_vectors(count, dimensions, seed, clusters=40):
    """Vectors around a few centres, like real embeddings (and unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimensions))
    vectors = centres[rng.integers(clusters, size=count)] + 0.35 * rng.normal(size=(count, dimensions))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def load_fresh_rows(model, vectors, **columns):
    """Insert rows whose vectors are already fresh (vector hash = source hash)."""
    rows = [model(text=f"passage {i}", **{name: values[i] for name, values in columns.items()}) for i in range(len(vectors))]
    model.objects.bulk_create(rows, batch_size=2000)
    store_as_fresh(rows, vectors)
    connection.cursor().execute(f"ANALYZE {model._meta.db_table}")


@pytest.fixture(scope="module")
def passages(django_db_setup, django_db_blocker):
    vectors = clustered_vectors(ROWS, DIMENSIONS, seed=7)
    with django_db_blocker.unblock():
        load_fresh_rows(Passage, vectors, bucket=[i % BUCKETS for i in range(ROWS)])
        ids = list(Passage.objects.order_by("pk").values_list("pk", flat=True))
        yield ids, vectors
        Passage.objects.all().delete()


def oracle(query, ids, vectors, k, keep=None):
    """Top-k ids and cosine scores by sentence-transformers' exact search."""
    if keep is not None:
        ids = [pk for pk, kept in zip(ids, keep) if kept]
        vectors = vectors[np.asarray(keep)]
    hits = util.semantic_search(torch.tensor(query).unsqueeze(0), torch.tensor(vectors), top_k=k)[0]
    return [ids[hit["corpus_id"]] for hit in hits], [hit["score"] for hit in hits]


# Queries drawn around the same centres as the rows (the same seed draws the
# same centres first), as real queries resemble the corpus.
QUERIES = clustered_vectors(ROWS + 200, DIMENSIONS, seed=7)[ROWS:]


def query_vector(number):
    return QUERIES[number % len(QUERIES)]


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exact_search_equals_sentence_transformers_oracle(passages, seed):
    ids, vectors = passages
    query = query_vector(seed)
    expected_ids, expected_scores = oracle(query, ids, vectors, 10)
    results = list(Passage.objects.nearest(query, k=10, exact=True))
    assert [r.pk for r in results] == expected_ids
    assert [r.score for r in results] == pytest.approx(expected_scores, abs=1e-5)
    assert [r.distance for r in results] == pytest.approx([1 - s for s in expected_scores], abs=1e-5)


@pytest.mark.django_db
def test_index_search_finds_the_exact_neighbours_unfiltered(passages):
    ids, vectors = passages
    recalls = []
    for seed in range(10, 30):
        query = query_vector(seed)
        expected, _ = oracle(query, ids, vectors, 10)
        found = [r.pk for r in Passage.objects.nearest(query, k=10, exact=False)]
        recalls.append(len(set(found) & set(expected)) / 10)
    assert np.mean(recalls) >= 0.95


@pytest.mark.django_db
@pytest.mark.parametrize("kept_buckets", [500, 100, 10, 1], ids=["50%", "10%", "1%", "0.1%"])
@pytest.mark.parametrize("exact", [False, None, True], ids=["index", "auto", "exact"])
def test_filtered_search_returns_k_rows_at_any_selectivity(passages, kept_buckets, exact):
    ids, vectors = passages
    query = query_vector(kept_buckets)
    keep = [i % BUCKETS < kept_buckets for i in range(ROWS)]
    expected, _ = oracle(query, ids, vectors, 10, keep=keep)
    results = list(Passage.objects.filter(bucket__lt=kept_buckets).nearest(query, k=10, exact=exact))
    assert len(results) == 10
    assert all(r.bucket < kept_buckets for r in results)
    assert [r.distance for r in results] == sorted(r.distance for r in results)
    recall = len({r.pk for r in results} & set(expected)) / 10
    assert recall >= (1.0 if exact else 0.8)


@pytest.mark.django_db
def test_plans_use_the_index_only_when_asked(passages):
    query = query_vector(5)
    assert "passage_embedding_hnsw" in Passage.objects.nearest(query, k=10, exact=False).explain()
    assert "passage_embedding_hnsw" not in Passage.objects.nearest(query, k=10, exact=True).explain()


@pytest.mark.django_db
def test_automatic_choice_follows_the_filter_estimate(passages, settings):
    # MAX_K is raised so a k beyond what an index scan can return (ef_search
    # tops out at 1000) is allowed at all.
    settings.SEMANTIC = {**settings.SEMANTIC, "EXACT_SEARCH_THRESHOLD": 500, "MAX_K": 5000}
    query = query_vector(6)
    assert Passage.objects.filter(bucket__lt=1).nearest(query, k=10).search_settings() == {"enable_indexscan": "off"}
    unfiltered = Passage.objects.nearest(query, k=10).search_settings()
    assert unfiltered["hnsw.iterative_scan"] == "relaxed_order"
    assert "enable_indexscan" not in unfiltered
    # Unsliced, or k beyond what an index scan returns: exact.
    assert Passage.objects.nearest(query).search_settings() == {"enable_indexscan": "off"}
    assert Passage.objects.nearest(query, k=1001).search_settings() == {"enable_indexscan": "off"}


def current_ef_search():
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('hnsw.ef_search', true)")
        return cursor.fetchone()[0]


@pytest.mark.django_db
def test_index_settings_apply_to_their_query_only_inside_a_transaction(passages):
    query = query_vector(8)
    before = current_ef_search()
    search = Passage.objects.annotate(ef=RawSQL("current_setting('hnsw.ef_search')", [])).nearest(
        query, k=10, exact=False, ef_search=123
    )
    assert {row.ef for row in search} == {"123"}
    assert current_ef_search() == before
    # k above ef_search raises it, or the index could not return k rows.
    wide = Passage.objects.annotate(ef=RawSQL("current_setting('hnsw.ef_search')", [])).nearest(query, k=300, exact=False)
    rows = list(wide)
    assert len(rows) == 300 and rows[0].ef == "300"


@pytest.mark.django_db(transaction=True)
def test_index_settings_do_not_leak_in_autocommit(passages):
    assert not connection.in_atomic_block
    before = current_ef_search()
    list(Passage.objects.nearest(query_vector(9), k=5, exact=False, ef_search=77))
    assert current_ef_search() == before != "77"


@pytest.mark.django_db
def test_similar_to_leaves_the_row_itself_out(passages):
    ids, vectors = passages
    anchor = Passage.objects.get(pk=ids[42])
    expected, _ = oracle(vectors[42], ids, vectors, 11)
    results = list(Passage.objects.similar_to(anchor, k=10, exact=True))
    assert anchor.pk not in [r.pk for r in results]
    assert [r.pk for r in results] == [pk for pk in expected if pk != anchor.pk][:10]
    assert [r.pk for r in Passage.objects.similar_to(anchor.pk, k=10, exact=True)] == [r.pk for r in results]


@pytest.mark.django_db
def test_similar_to_a_row_without_vector_is_a_clear_error(passages):
    row = Passage.objects.create(text="", bucket=0)
    with pytest.raises(ValueError, match="has no searchable embedding vector"):
        Passage.objects.similar_to(row)
    with pytest.raises(ValueError, match="has no searchable embedding vector"):
        Passage.objects.similar_to(10**12)


@pytest.mark.django_db
def test_huge_k_returns_every_matching_row(passages, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "MAX_K": 100_000}
    results = list(Passage.objects.filter(bucket__lt=5).nearest(query_vector(4), k=100_000))
    assert len(results) == 50
    assert [r.distance for r in results] == sorted(r.distance for r in results)


@pytest.mark.django_db
def test_bad_vector_and_field_are_clear_errors(passages):
    with pytest.raises(ValueError, match="32-dimensional"):
        Passage.objects.nearest(np.zeros(7), k=3)
    with pytest.raises(ImproperlyConfigured, match="has no embedding field"):
        Passage.objects.nearest(query_vector(1), field="text", k=3)
    with pytest.raises(ImproperlyConfigured, match="has no embedding field"):
        Passage.objects.semantic_search("anything", field="no_such_field")
    with pytest.raises(ValueError, match="iterative_scan"):
        Passage.objects.nearest(query_vector(1), k=3, iterative_scan="sideways")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query",
    ["'; DROP TABLE searchapp_passage; --", "100% \\ _ %s %(x)s", "word " * 200, "emoji 🙂 and 中文", "tab\tand\x00nul"],
    ids=["sql", "placeholders", "at-the-length-bound", "unicode", "control-characters"],
)
def test_odd_queries_search_normally(passages, query):
    results = list(Passage.objects.semantic_search(query, k=5))
    assert len(results) == 5
    assert Passage.objects.count() >= ROWS


@pytest.mark.django_db
def test_repeated_query_runs_no_model_and_no_cache_lookup(passages, stats_delta):
    field = Passage._meta.get_field("embedding")
    first = embed_query(field, "a query asked twice")
    after_first = stats_delta()
    second = embed_query(field, "a query asked twice")
    assert np.array_equal(first, second)
    assert stats_delta() == after_first


@pytest.mark.django_db
def test_inner_product_metric_ranks_and_scores_by_dot_product(django_db_blocker):
    vectors = clustered_vectors(500, DIMENSIONS, seed=3) * np.linspace(0.5, 2.0, 500)[:, None].astype(np.float32)
    load_fresh_rows(IpPassage, vectors)
    ids = list(IpPassage.objects.order_by("pk").values_list("pk", flat=True))
    query = query_vector(12)
    dots = vectors @ query
    expected = [ids[i] for i in np.argsort(-dots)[:10]]
    results = list(IpPassage.objects.nearest(query, k=10, exact=True))
    assert [r.pk for r in results] == expected
    assert [r.score for r in results] == pytest.approx(sorted(dots, reverse=True)[:10], abs=1e-4)
    assert IpPassage._meta.get_field("embedding").opclass == "vector_ip_ops"
    # min_score is a lower bound on the dot product.
    floor = results[4].score
    assert [r.pk for r in IpPassage.objects.nearest(query, min_score=floor, exact=True)] == expected[:5]


@pytest.mark.django_db
def test_vectors_of_another_encoder_configuration_are_left_out(passages):
    ids, vectors = passages
    field = Passage._meta.get_field("embedding")
    query = vectors[7]
    top = [r.pk for r in Passage.objects.nearest(query, k=3, exact=True)]
    assert top[0] == ids[7]
    # As if row 7 had been embedded by another model: same text, other fingerprint.
    other = "f" * len(field.fingerprint) if not field.fingerprint.startswith("f") else "0" * len(field.fingerprint)
    row = Passage.objects.get(pk=ids[7])
    Passage.objects.filter(pk=ids[7]).update(
        **{field.vector_hash_attname: other + getattr(row, field.vector_hash_attname)[len(other):]}
    )
    assert ids[7] not in [r.pk for r in Passage.objects.nearest(query, k=3, exact=True)]
    assert ids[7] not in [r.pk for r in Passage.objects.nearest(query, k=3, exact=False)]


@pytest.mark.django_db
def test_searches_built_from_one_template_keep_their_own_vectors(passages):
    """Each search's annotations carry its own query vector (they are copied from one resolved template per field).

    Checked where two searches meet in one statement: the rows nearest to
    one vector, re-ranked by another, equal the oracle of the second over
    the first's rows; and an annotation of one search is not equal to the
    other's.
    """
    ids, vectors = passages
    first, second = query_vector(40), query_vector(41)
    nearest_first = Passage.objects.nearest(first, k=50, exact=True)
    first_ids, _ = oracle(first, ids, vectors, 50)
    assert [row.pk for row in nearest_first] == first_ids

    reranked = Passage.objects.filter(pk__in=nearest_first.values("pk")).nearest(second, k=10, exact=True)
    keep = np.isin(ids, first_ids)
    expected, scores = oracle(second, ids, vectors, 10, keep=keep)
    rows = list(reranked)
    assert [row.pk for row in rows] == expected
    assert [row.score for row in rows] == pytest.approx(scores, abs=1e-5)

    one, other = (Passage.objects.nearest(vector, k=10).query.annotations["distance"] for vector in (first, second))
    assert one != other
    assert one == Passage.objects.nearest(first, k=10).query.annotations["distance"]


@pytest.mark.django_db
def test_a_search_after_values_adds_its_annotations_to_the_values(passages):
    ids, vectors = passages
    query = query_vector(42)
    expected, scores = oracle(query, ids, vectors, 3)
    rows = list(Passage.objects.values("pk").nearest(query, k=3, exact=True))
    assert [set(row) for row in rows] == [{"pk", "distance", "score"}] * 3
    assert [row["pk"] for row in rows] == expected
    assert [row["score"] for row in rows] == pytest.approx(scores, abs=1e-5)


@pytest.mark.django_db
def test_hostile_search_inputs_are_refused_or_cleaned_by_the_library(passages):
    """The bounds hold for every caller, not only the views: big k, long queries, NUL, huge candidate counts."""
    with pytest.raises(ValueError, match="k must be at most"):
        Passage.objects.nearest(query_vector(1), k=2**63)
    for search in (Passage.objects.semantic_search, Passage.objects.hybrid_search):
        with pytest.raises(ValueError, match="longer than 1000 characters"):
            search("word " * 200_000, k=5)
        with pytest.raises(ValueError, match="candidates must be at most"):
            search("passage", k=5, candidates=10**9)
        # NUL and other control characters are word breaks, in the vector and the text query alike.
        assert [row.pk for row in search("passage\x00 1\x07", k=5, exact=True)] == [
            row.pk for row in search("passage 1", k=5, exact=True)
        ]


@pytest.mark.django_db
def test_a_search_of_no_rows_is_empty_not_an_error(passages):
    assert list(Passage.objects.none().nearest(query_vector(2), k=3)) == []
    assert list(Passage.objects.filter(pk__in=[]).nearest(query_vector(2), k=3)) == []
