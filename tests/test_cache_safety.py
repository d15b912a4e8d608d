"""Nothing read from Redis is unpickled: planted values are ignored, counted, and overwritten.

The attacker here can write to the Redis the app uses (the broker's other
clients, a neighbour on an open port) and knows how keys are made. Each
test plants a pickle whose unpickling would create a marker file, under a
key the code reads, and checks that the marker never appears and the code
still does its job. On the code before semantic.cache read raw values,
Django's RedisCache unpickled them: the marker appeared.
"""

import os
import pickle
import uuid

import numpy as np
import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from semantic import cache
from semantic.checks import check_caches
from semantic.hashing import clean_text
from semantic.retrieval.query_vectors import forget_query_vectors
from semantic.worker import embed_batch
from tests.conftest import store_as_fresh
from tests.searchapp.models import Passage
from tests.testapp.models import Note

RUN = uuid.uuid4().hex[:12]


class Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(tmp_path):
    """plant(key_name): a pickle under that (unprefixed) key name; ``.ran()`` tells whether any was unpickled."""
    marker = tmp_path / "unpickled"
    store = cache.get_store()
    keys = []

    def plant(name):
        store.client(write=True).set(store.key(name), pickle.dumps(Payload(marker)))
        keys.append(store.key(name))

    plant.ran = marker.exists
    yield plant
    if keys:
        store.client(write=True).delete(*keys)


@pytest.mark.django_db
def test_a_pickle_planted_under_a_query_key_never_runs_and_the_search_answers(planted, stats_delta):
    field = Passage._meta.get_field("embedding")
    rows = Passage.objects.bulk_create([Passage(text=f"passage {i} {RUN}", bucket=i) for i in range(5)])
    vectors = np.eye(5, field.dimensions, dtype=np.float32)
    store_as_fresh(rows, vectors)
    query = f"what the planted key answers {RUN}"
    key = field.encoder.text_hash(clean_text(query), query=True)
    # Under the query key space, and the documents' one (where query vectors lived before).
    planted(cache.QUERY_KEY_PREFIX + key)
    planted(cache.KEY_PREFIX + key)
    forget_query_vectors()

    found = list(Passage.objects.semantic_search(query, k=3, exact=True))

    assert not planted.ran()
    assert len(found) == 3
    assert stats_delta()["rejected"] >= 1
    # The planted value was replaced by the real vector, which later searches read.
    expected, _ = field.encoder.encode([clean_text(query)], query=True)
    assert np.allclose(cache.get_vectors([key], dimensions=field.dimensions, queries=True)[key], expected[0])


@pytest.mark.django_db
def test_a_pickle_planted_under_a_document_key_never_runs_and_the_row_gets_its_vector(planted):
    field = Note._meta.get_field("embedding")
    note = Note.objects.create(title=f"a note whose text key is planted {RUN}")
    text = field.build_text(note)
    planted(cache.KEY_PREFIX + field.encoder.text_hash(text))

    result = embed_batch(field)

    assert not planted.ran()
    assert result.embedded >= 1
    note.refresh_from_db()
    expected, _ = field.encoder.encode([text])
    assert np.allclose(note.embedding, expected[0], atol=1e-5)


@pytest.mark.django_db
def test_pickles_planted_under_counters_and_progress_records_never_run(planted):
    for name in cache.STAT_NAMES:
        planted(f"{cache.STATS_PREFIX}{name}")
    planted("semantic:reindex:progress")
    assert cache.get_stats() == dict.fromkeys(cache.STAT_NAMES, 0)
    assert cache.get_record("semantic:reindex:progress") is None
    assert not planted.ran()


# --- values read back (no services) ---------------------------------------------


def test_only_whole_finite_float32_vectors_of_the_expected_width_are_read_back():
    vector = np.linspace(-1, 1, 8, dtype=np.float32)
    stored = cache.encode_vector(vector)
    assert np.array_equal(cache.decode_vector(stored, 8), vector)
    assert np.array_equal(cache.decode_vector(stored), vector)
    for value in (stored[:-4], stored + b"\0\0\0\0", stored[:-1], b"", "text", None, pickle.dumps(vector)):
        assert cache.decode_vector(value, 8) is None
    broken = vector.copy()
    broken[3] = np.nan
    assert cache.decode_vector(cache.encode_vector(broken), 8) is None


def test_vectors_are_stored_little_endian_whatever_the_input_order():
    vector = np.array([1.5, -2.0], dtype=">f4")
    assert cache.encode_vector(vector) == np.array([1.5, -2.0], dtype="<f4").tobytes()


# --- configuration ----------------------------------------------------------------


@override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
def test_a_cache_alias_that_would_pickle_is_refused_with_a_hint():
    errors = check_caches()
    assert [error.id for error in errors] == ["semantic.E014"]
    assert errors[0].level == checks.ERROR and "RedisCache" in errors[0].hint
    with pytest.raises(ImproperlyConfigured, match="semantic.E014"):
        cache.get_store()


def test_an_unknown_cache_alias_is_reported(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "QUERY_CACHE_ALIAS": "nowhere"}
    assert [error.id for error in check_caches()] == ["semantic.E014"]


@pytest.mark.django_db
def test_query_vectors_live_in_their_own_key_space_and_expire_soon(settings):
    """A visitor's query text costs one short-lived key, never a 30-day one beside the workers' vectors."""
    settings.SEMANTIC = {**settings.SEMANTIC, "QUERY_CACHE_TIMEOUT": 120}
    field = Passage._meta.get_field("embedding")
    query = f"a query nobody asked before {RUN}"
    key = field.encoder.text_hash(clean_text(query), query=True)
    forget_query_vectors()
    list(Passage.objects.semantic_search(query, k=1))
    store = cache.get_store(queries=True)
    client = store.client()
    assert 0 < client.ttl(store.key(cache.QUERY_KEY_PREFIX + key)) <= 120
    assert not client.exists(store.key(cache.KEY_PREFIX + key))
