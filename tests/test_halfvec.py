"""
``EmbeddingField(storage="halfvec")``: float16 columns, end to end.

The worker's vectors are stored rounded to float16 (exactly numpy's
rounding), in a ``halfvec`` column of half the bytes; searches compare the
query, rounded the same way, and equal a numpy oracle over the rounded
vectors; index searches walk the halfvec HNSW index, of the rows and of the
chunk table; the checks and migrations treat the storage as schema.
"""

import random
import uuid

import numpy as np
import pytest
from django.apps import apps
from django.core import checks
from django.db import connection, models
from django.db.migrations import CreateModel, Migration
from django.db.migrations.autodetector import MigrationAutodetector
from django.db.migrations.graph import MigrationGraph
from django.db.migrations.questioner import MigrationQuestioner
from django.db.migrations.state import ModelState, ProjectState
from django.test.utils import isolate_apps
from pgvector.django import HnswIndex, IvfflatIndex, VectorField

from semantic import EmbeddingField
from semantic.chunking import Chunker, weighted_mean
from semantic.worker import embed_stale_rows
from tests.conftest import store_as_fresh, store_chunks
from tests.searchapp.models import HalfChunkedPassage, HalfPassage, Passage
from tests.test_read_path import clustered_vectors, load_fresh_rows

DIMENSIONS = 32
ROWS = 4000
BUCKETS = 100
RUN = uuid.uuid4().hex[:12]
WORDS = "river council school budget report flood library opening cycle lanes heatwave warning football club".split()


def half(vectors):
    """``vectors`` rounded to float16, as float32: what a halfvec column holds."""
    return np.asarray(vectors, dtype=np.float32).astype(np.float16).astype(np.float32)


def prose(words, seed):
    rng = random.Random(f"{RUN}-{seed}")
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def column_type(table, column):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            [table, column],
        )
        return cursor.fetchone()[0]


def index_opclass(index_name):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT o.opcname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_opclass o ON o.oid = i.indclass[0] WHERE c.relname = %s",
            [index_name],
        )
        return cursor.fetchone()[0]


def ids(messages):
    return [message.id for message in messages]


# --- the field ---------------------------------------------------------------------


def test_storage_is_validated_and_is_schema():
    with pytest.raises(ValueError, match=r"'float8'.*'vector', 'halfvec'.*2,000.*4,000"):
        EmbeddingField(source="text", model="tiny", storage="float8")
    field = HalfPassage._meta.get_field("embedding")
    assert field.db_type(connection) == "halfvec(32)"
    assert field.opclass == "halfvec_cosine_ops"
    name, path, args, kwargs = field.deconstruct()
    assert kwargs["storage"] == "halfvec"
    rebuilt = EmbeddingField(*args, **kwargs)
    assert rebuilt.db_type(connection) == "halfvec(32)" and rebuilt.storage == "halfvec"
    # The default is left out: migrations written before storage existed stay as they are.
    assert "storage" not in Passage._meta.get_field("embedding").deconstruct()[3]
    assert Passage._meta.get_field("embedding").db_type(connection) == "vector(32)"
    assert EmbeddingField(source="text", model="tiny", metric="l2", storage="halfvec").opclass == "halfvec_l2_ops"


# --- the worker ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_worker_stores_the_models_vectors_rounded_to_float16():
    texts = [prose(12, seed) for seed in range(20)]
    rows = HalfPassage.objects.bulk_create([HalfPassage(text=text, bucket=0) for text in texts])
    field = HalfPassage._meta.get_field("embedding")
    result = embed_stale_rows(field)
    assert result.embedded == len(rows)

    expected, failed = field.encoder.encode(texts)
    assert not failed
    expected = np.stack(expected)
    stored = np.array([HalfPassage.objects.get(pk=row.pk).embedding for row in rows], dtype=np.float32)
    # Exactly numpy's round-to-nearest float16, and within float16's precision of the model's vectors.
    assert np.array_equal(stored, half(expected))
    assert np.allclose(stored, expected, rtol=2**-11, atol=2**-24)
    assert not np.array_equal(stored, expected)
    assert column_type(HalfPassage._meta.db_table, "embedding") == "halfvec(32)"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT DISTINCT pg_column_size(embedding) FROM {HalfPassage._meta.db_table}")
        # Two bytes per dimension, after a one-byte length (a value this short
        # is stored with a short header) and two int16 (dimensions, unused).
        assert cursor.fetchall() == [(1 + 4 + 2 * DIMENSIONS,)]


@pytest.mark.django_db
def test_a_chunked_halfvec_field_stores_and_indexes_its_chunks_as_halfvec():
    field = HalfChunkedPassage._meta.get_field("embedding")
    chunk_model = field.chunk_model
    chunk_index = chunk_model._meta.indexes[0].name
    assert column_type(chunk_model._meta.db_table, "embedding") == "halfvec(32)"
    assert index_opclass(chunk_index) == "halfvec_cosine_ops"

    texts = [prose(40, 100 + seed) for seed in range(12)]
    rows = HalfChunkedPassage.objects.bulk_create([HalfChunkedPassage(text=text, bucket=i % 3) for i, text in enumerate(texts)])
    assert embed_stale_rows(field).embedded == len(rows)

    chunker = Chunker(field.encoder, field.overlap)
    for row, text in zip(rows, texts):
        expected = chunker.split(text)
        assert len(expected) > 1
        vectors, failed = field.encoder.encode([chunk.text for chunk in expected])
        assert not failed
        stored = list(chunk_model.objects.filter(owner=row).order_by("index"))
        assert [chunk.text for chunk in stored] == [chunk.text for chunk in expected]
        assert np.array_equal(np.array([chunk.embedding for chunk in stored], dtype=np.float32), half(np.stack(vectors)))
        # The row vector is the mean of the model's (float32) chunk vectors, rounded once.
        mean = weighted_mean(vectors, [chunk.tokens for chunk in expected], normalize=True)
        assert np.array_equal(np.asarray(HalfChunkedPassage.objects.get(pk=row.pk).embedding, dtype=np.float32), half(mean))

    # Each row ranked by its best chunk, against an oracle over the stored float16 chunks.
    chunks = list(chunk_model.objects.values_list("owner_id", "index", "embedding"))
    query = half(np.asarray(chunks[7][2]) + 0.3 * np.random.default_rng(5).normal(size=DIMENSIONS))
    best = {}
    for owner, index, vector in chunks:
        vector = np.asarray(vector, dtype=np.float64)
        distance = 1 - vector @ query / (np.linalg.norm(vector) * np.linalg.norm(query))
        best[owner] = min(best.get(owner, (2.0, 0)), (distance, index))
    expected = sorted(best, key=lambda owner: best[owner])[:5]
    for exact in (True, False):
        found = list(HalfChunkedPassage.objects.nearest(query, k=5, exact=exact))
        assert [row.pk for row in found] == expected
        for row in found:
            assert row.distance == pytest.approx(best[row.pk][0], abs=1e-5)
            assert row.best_chunk.index == best[row.pk][1]


# --- searching -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def passages(django_db_setup, django_db_blocker):
    vectors = clustered_vectors(ROWS, DIMENSIONS, seed=17)
    with django_db_blocker.unblock():
        # Written as float32 values; the column keeps their float16 rounding.
        load_fresh_rows(HalfPassage, vectors, bucket=[i % BUCKETS for i in range(ROWS)])
        yield list(HalfPassage.objects.order_by("pk").values_list("pk", flat=True)), vectors
        HalfPassage.objects.all().delete()


QUERIES = clustered_vectors(ROWS + 30, DIMENSIONS, seed=17)[ROWS:]


def oracle(query, ids, vectors, k, keep=None):
    """Top-k (pk, cosine distance) over the float16 rows and the float16 query, in float64."""
    rows, query = half(vectors).astype(np.float64), half(query).astype(np.float64)
    distances = 1 - rows @ query / (np.linalg.norm(rows, axis=1) * np.linalg.norm(query))
    order = [i for i in np.argsort(distances, kind="stable") if keep is None or keep[i]][:k]
    return [(ids[i], distances[i]) for i in order], dict(zip(ids, distances))


@pytest.mark.django_db
@pytest.mark.parametrize("number", [0, 1, 2])
def test_exact_search_equals_a_numpy_oracle_over_float16_vectors(passages, number):
    ids, vectors = passages
    expected, distance_of = oracle(QUERIES[number], ids, vectors, 10)
    results = list(HalfPassage.objects.nearest(QUERIES[number], k=10, exact=True))
    assert [r.distance for r in results] == pytest.approx([d for _, d in expected], abs=1e-5)
    # The same rows in the same order, but for rows tied within float32's rounding.
    assert [distance_of[r.pk] for r in results] == pytest.approx([d for _, d in expected], abs=1e-5)
    assert [r.score for r in results] == pytest.approx([1 - d for _, d in expected], abs=1e-5)


@pytest.mark.django_db
def test_index_search_walks_the_halfvec_index(passages):
    ids, vectors = passages
    query = QUERIES[3]
    assert index_opclass("halfpassage_embedding_hnsw") == "halfvec_cosine_ops"
    assert "halfpassage_embedding_hnsw" in HalfPassage.objects.nearest(query, k=10, exact=False).explain()
    assert "halfpassage_embedding_hnsw" not in HalfPassage.objects.nearest(query, k=10, exact=True).explain()
    recalls = []
    for query in QUERIES[4:24]:
        expected, _ = oracle(query, ids, vectors, 10)
        found = [r.pk for r in HalfPassage.objects.nearest(query, k=10, exact=False)]
        recalls.append(len(set(found) & {pk for pk, _ in expected}) / 10)
    assert np.mean(recalls) >= 0.95


@pytest.mark.django_db
@pytest.mark.parametrize("kept_buckets", [10, 1], ids=["10%", "1%"])
def test_filtered_index_search_returns_k_rows(passages, kept_buckets):
    ids, vectors = passages
    keep = np.arange(ROWS) % BUCKETS < kept_buckets
    expected, _ = oracle(QUERIES[25], ids, vectors, 10, keep)
    results = list(HalfPassage.objects.filter(bucket__lt=kept_buckets).nearest(QUERIES[25], k=10, exact=False))
    assert len(results) == 10 and all(r.bucket < kept_buckets for r in results)
    assert len({r.pk for r in results} & {pk for pk, _ in expected}) >= 8


@pytest.mark.django_db
def test_similar_to_compares_a_rows_stored_halfvec(passages):
    ids, vectors = passages
    expected, _ = oracle(vectors[5], ids, vectors, 6)
    found = [r.pk for r in HalfPassage.objects.similar_to(ids[5], k=5, exact=True)]
    assert ids[5] not in found and found == [pk for pk, _ in expected if pk != ids[5]][:5]


CHUNKED_ROWS = 2000
CHUNKS = 4


@pytest.fixture(scope="module")
def chunked(django_db_setup, django_db_blocker):
    """2,000 rows of 4 chunks each, known float32 vectors stored as halfvec; enough for the planner to want the index."""
    rng = np.random.default_rng(23)
    centres = clustered_vectors(CHUNKED_ROWS, DIMENSIONS, seed=29)
    chunk_vectors = centres[:, None, :] + 0.6 * rng.normal(size=(CHUNKED_ROWS, CHUNKS, DIMENSIONS)).astype(np.float32)
    chunk_vectors /= np.linalg.norm(chunk_vectors, axis=-1, keepdims=True)
    with django_db_blocker.unblock():
        rows = HalfChunkedPassage.objects.bulk_create(
            [HalfChunkedPassage(text=f"passage {i}", bucket=i % BUCKETS) for i in range(CHUNKED_ROWS)], batch_size=2000
        )
        store_as_fresh(rows, chunk_vectors.mean(axis=1))
        store_chunks(rows, chunk_vectors)
        yield [row.pk for row in rows], chunk_vectors
        HalfChunkedPassage.objects.all().delete()


def best_chunk_oracle(query, ids, chunk_vectors, k, keep=None):
    """Top-k (pk, distance, best chunk index) by each row's best float16 chunk against the float16 query."""
    chunks, query = half(chunk_vectors).astype(np.float64), half(query).astype(np.float64)
    distances = 1 - chunks @ query / (np.linalg.norm(chunks, axis=-1) * np.linalg.norm(query))
    best, index = distances.min(axis=1), distances.argmin(axis=1)
    order = [i for i in np.argsort(best, kind="stable") if keep is None or keep[i]][:k]
    return [(ids[i], best[i], int(index[i])) for i in order]


@pytest.mark.django_db
def test_search_by_chunk_walks_the_chunk_tables_halfvec_index(chunked):
    ids, chunk_vectors = chunked
    chunk_index = HalfChunkedPassage._meta.get_field("embedding").chunk_model._meta.indexes[0].name
    query = QUERIES[26]
    assert chunk_index in HalfChunkedPassage.objects.nearest(query, k=10, exact=False).explain()
    assert chunk_index not in HalfChunkedPassage.objects.nearest(query, k=10, exact=True).explain()
    found, total = 0, 0
    for number, query in enumerate(QUERIES[:12]):
        keep = None if number % 2 else np.arange(CHUNKED_ROWS) % BUCKETS < 10
        expected = best_chunk_oracle(query, ids, chunk_vectors, 10, keep)
        queryset = HalfChunkedPassage.objects.all() if keep is None else HalfChunkedPassage.objects.filter(bucket__lt=10)
        exact = list(queryset.nearest(query, k=10, exact=True))
        assert [r.distance for r in exact] == pytest.approx([d for _, d, _ in expected], abs=1e-5)
        assert [(r.pk, r.best_chunk.index) for r in exact][:3] == [(pk, i) for pk, _, i in expected][:3]
        index = list(queryset.nearest(query, k=10, exact=False))
        assert len({r.pk for r in index}) == 10
        found += len({r.pk for r in index} & {pk for pk, _, _ in expected})
        total += 10
    assert found / total >= 0.95


# --- checks ------------------------------------------------------------------------------


def field_checks(name, storage, opclass=None, *, index=HnswIndex, metric="cosine", dimensions=None, chunks=False):
    """The messages of an EmbeddingField on a model declared here, indexed with ``opclass`` (None: no index).

    Call under isolate_apps. E004 (the tiny model makes 32 dimensions, not ``dimensions``) is left out.
    """
    indexes = [] if opclass is None else [index(name=f"{name.lower()}_ix", fields=["embedding"], opclasses=[opclass])]
    attrs = {
        "__module__": __name__,
        "Meta": type("Meta", (), {"app_label": "testapp", "indexes": indexes}),
        "text": models.TextField(),
        "embedding": EmbeddingField(source="text", model="tiny", metric=metric, dimensions=dimensions, chunks=chunks, storage=storage),
    }
    return [m for m in type(name, (models.Model,), attrs)._meta.get_field("embedding").check() if m.id != "semantic.E004"]


@isolate_apps("tests.testapp")
def test_an_index_of_the_other_storage_is_an_error_and_the_right_one_passes():
    messages = field_checks("HalfOnVector", "halfvec", "vector_cosine_ops")
    assert ids(messages) == ["semantic.E009"]
    assert isinstance(messages[0], checks.Error) and "halfvec_cosine_ops" in messages[0].hint
    messages = field_checks("VectorOnHalf", "vector", "halfvec_l2_ops", metric="l2")
    assert ids(messages) == ["semantic.E009"] and "vector_l2_ops" in messages[0].hint
    # The right storage but another metric: the existing warning, with the halfvec opclass.
    messages = field_checks("HalfL2", "halfvec", "halfvec_l2_ops")
    assert ids(messages) == ["semantic.W002"] and "halfvec_cosine_ops" in messages[0].hint
    assert field_checks("HalfIp", "halfvec", "halfvec_ip_ops", metric="inner_product") == []
    assert field_checks("HalfIvf", "halfvec", "halfvec_cosine_ops", index=IvfflatIndex) == []
    assert [m for m in HalfPassage._meta.get_field("embedding").check() if m.id.startswith("semantic.")] == []


@isolate_apps("tests.testapp")
def test_dimensions_beyond_what_the_storage_can_index_are_an_error():
    messages = field_checks("Wide", "vector", "vector_cosine_ops", dimensions=3072)
    assert ids(messages) == ["semantic.E008"]
    assert "at most 2,000" in messages[0].msg and "storage='halfvec'" in messages[0].hint and "halfvec_cosine_ops" in messages[0].hint
    assert field_checks("WideHalf", "halfvec", "halfvec_cosine_ops", dimensions=3072) == []
    messages = field_checks("WiderHalf", "halfvec", "halfvec_cosine_ops", dimensions=4001)
    assert ids(messages) == ["semantic.E008"] and "at most 4,000" in messages[0].msg
    assert "16,000" in field_checks("Widest", "halfvec", dimensions=16_001)[0].msg
    # A chunked field is always indexed: its chunk table's HNSW index.
    messages = field_checks("WideChunks", "vector", dimensions=2048, chunks=True)
    assert ids(messages) == ["semantic.E008"] and "chunk table" in messages[0].msg
    # halfvec indexes them; only the row table's own index is missing (W001, with the halfvec opclass).
    messages = field_checks("WideChunksHalf", "halfvec", dimensions=2048, chunks=True)
    assert ids(messages) == ["semantic.W001"] and 'opclasses=["halfvec_cosine_ops"]' in messages[0].hint
    # Unindexed and unchunked: only the missing index is reported, with a hint that works.
    messages = field_checks("WideBare", "vector", dimensions=3072)
    assert ids(messages) == ["semantic.W001"] and "storage='halfvec'" in messages[0].hint


# --- migrations ----------------------------------------------------------------------------


def switch_state(storage):
    state = ProjectState()
    state.add_model(
        ModelState(
            "searchapp",
            "StorageSwitch",
            [
                ("id", models.BigAutoField(primary_key=True)),
                ("embedding", EmbeddingField(model="tiny", dimensions=3, storage=storage)),
            ],
            {"indexes": [HnswIndex(name="storageswitch_hnsw", fields=["embedding"], opclasses=[f"{storage}_cosine_ops"])]},
        )
    )
    return state


def autodetected(before, after):
    """The one migration makemigrations would write for searchapp from ``before`` to ``after``."""
    questioner = MigrationQuestioner(specified_apps={"searchapp"})
    (migration,) = MigrationAutodetector(before, after, questioner).changes(graph=MigrationGraph())["searchapp"]
    return migration


@pytest.mark.django_db
def test_switching_storage_migrates_the_column_its_values_and_its_index():
    """vector -> halfvec: the index is dropped before the column changes type (PostgreSQL cannot keep it) and rebuilt."""
    before = switch_state("vector")
    migration = autodetected(before, switch_state("halfvec"))
    assert [type(op).__name__ for op in migration.operations] == ["RemoveIndex", "AlterField", "AddIndex"]
    assert migration.operations[1].field.deconstruct()[3]["storage"] == "halfvec"

    create = Migration("0001_switch", "searchapp")
    model = before.models["searchapp", "storageswitch"]
    create.operations = [CreateModel("StorageSwitch", fields=list(model.fields.items()), options=model.options)]
    with connection.schema_editor() as editor:
        state = create.apply(ProjectState(), editor)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO searchapp_storageswitch (embedding) VALUES ('[0.1, 0.2, 0.333333333]')")
    with connection.schema_editor() as editor:
        migration.apply(state, editor)
    assert column_type("searchapp_storageswitch", "embedding") == "halfvec(3)"
    assert index_opclass("storageswitch_hnsw") == "halfvec_cosine_ops"
    with connection.cursor() as cursor:
        cursor.execute("SELECT embedding::text FROM searchapp_storageswitch")
        stored = [float(v) for v in cursor.fetchone()[0].strip("[]").split(",")]
    assert np.array_equal(np.float32(stored), half([0.1, 0.2, 0.333333333]))


def test_switching_a_chunked_fields_storage_migrates_its_chunk_table_too():
    """The chunk table's column and index follow the field: the same remove, alter, add, for both tables."""
    after = ProjectState.from_apps(apps)
    before = after.clone()
    for model, field in (("halfchunkedpassage", EmbeddingField(dimensions=32)), ("halfchunkedpassageembeddingchunk", VectorField(dimensions=32))):
        state = before.models["searchapp", model]
        state.fields["embedding"] = field
        state.options["indexes"] = [HnswIndex(name=i.name, fields=i.fields, opclasses=["vector_cosine_ops"]) for i in state.options["indexes"]]
    migration = autodetected(before, after)
    steps = [(type(op).__name__, op.model_name) for op in migration.operations]
    for model in ("halfchunkedpassage", "halfchunkedpassageembeddingchunk"):
        mine = [kind for kind, name in steps if name == model]
        assert mine == ["RemoveIndex", "AlterField", "AddIndex"], model
    # Every index is removed before any column changes type.
    kinds = [kind for kind, _ in steps]
    assert max(i for i, kind in enumerate(kinds) if kind == "RemoveIndex") < kinds.index("AlterField")
