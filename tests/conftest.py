"""
Shared fixtures. Everything is real: the embedded PostgreSQL with pgvector
and a local redis-server (both started by the project settings), a Celery
worker consuming the real broker, and models loaded by sentence-transformers.
"""

import logging
import os
import time
import uuid

# Before anything imports huggingface_hub: a hub name must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tiny_model():
    """The tiny random bi-encoder the 'tiny' alias points at.

    The other one, which 'tiny_next' names (fields are switched to it), is
    built too: commands run in subprocesses check every alias's directory.
    """
    from django.conf import settings

    from tests.modelfactory import build_tiny_model

    build_tiny_model(settings.NEXT_MODEL_DIR, dimensions=settings.NEXT_DIMENSIONS, seed=1)
    return build_tiny_model(settings.TINY_MODEL_DIR, dimensions=settings.TINY_DIMENSIONS)


@pytest.fixture(scope="session")
def cross_encoder_dir():
    """A tiny random cross-encoder (reranker) directory."""
    from django.conf import settings

    from tests.modelfactory import build_tiny_cross_encoder

    return build_tiny_cross_encoder(settings.TEST_MODEL_DIR / "tiny-cross-encoder-32")


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker):
    """A real Celery worker (solo pool, in a thread) on the real Redis broker.

    It consumes the embedding queue, so tests see rows embedded the way
    production does. Tests using it need ``django_db(transaction=True)``:
    the worker's own connection cannot see a test's uncommitted rows.
    """
    from celery.contrib.testing.worker import start_worker
    from django.conf import settings

    from project.celery import app

    global _worker_running
    with django_db_blocker.unblock():
        with start_worker(
            app,
            pool="solo",
            perform_ping_check=False,
            queues=[settings.SEMANTIC.get("QUEUE", "semantic"), "celery"],
            shutdown_timeout=30,
        ) as worker:
            _worker_running = True
            try:
                yield worker
            finally:
                _worker_running = False


# Whether the session's in-thread worker is running: once a test started it,
# it consumes wake-ups for every later test too, not only those asking for it.
_worker_running = False


@pytest.fixture(autouse=True)
def let_the_test_worker_finish():
    """After each test, while the in-thread worker runs, wait for the task it is running.

    Set up after pytest-django's database fixture, so this runs before the
    database is flushed: a TRUNCATE of every table while a task holds locks
    on one of them and asks for another deadlocks (seen at the teardown of
    an admin test, and of a test that did not ask for the worker but whose
    saves woke it). A task can still start between this wait and the
    flush: ``flush_retrying_deadlocks`` covers that.
    """
    yield
    if _worker_running:
        from celery.worker import state

        deadline = time.monotonic() + 30
        while (state.active_requests or state.reserved_requests) and time.monotonic() < deadline:
            time.sleep(0.05)


FLUSH_ATTEMPTS = 5


def flush_retrying_deadlocks(flush):
    """``TransactionTestCase._fixture_teardown`` run again when PostgreSQL ended its TRUNCATE as a deadlock victim.

    The flush runs in one transaction, so a victim left nothing half done;
    the worker's transaction it collided with goes on and ends, and the
    retry finds the tables free.
    """
    import functools

    from django.db import OperationalError

    @functools.wraps(flush)
    def teardown(self):
        for attempt in range(1, FLUSH_ATTEMPTS + 1):
            try:
                return flush(self)
            except Exception as exc:
                cause = exc.__cause__
                if attempt == FLUSH_ATTEMPTS or not (isinstance(cause, OperationalError) and "deadlock detected" in str(cause)):
                    raise
                time.sleep(0.2 * attempt)

    return teardown


def pytest_configure(config):
    from django.test import TransactionTestCase

    TransactionTestCase._fixture_teardown = flush_retrying_deadlocks(TransactionTestCase._fixture_teardown)


@pytest.fixture(autouse=True)
def forget_wake_keys():
    """After each test, clear every field's coalescing key.

    A test that sends its wake-ups to a queue no worker reads leaves the
    key set for COALESCE_SECONDS, and the next test's saves would send no
    wake-up at all (seen in CI: test_tables, then a bulk_create test waiting
    60 s for a worker nothing woke).
    """
    yield
    from django.apps import apps

    from semantic.fields import embedding_fields
    from semantic.wakeups import release_wake_key

    for model in apps.get_models():
        for field in embedding_fields(model):
            release_wake_key(model, field.name, "default")


def wait_until(predicate, timeout=60, interval=0.05, message="condition"):
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def stats_delta():
    """Returns a function giving the change in encoder/cache counters since the fixture ran."""
    from semantic import cache

    before = cache.get_stats()

    def delta():
        now = cache.get_stats()
        return {name: now[name] - before[name] for name in now}

    return delta


@pytest.fixture
def semantic_logs(caplog, monkeypatch):
    """``caplog`` receiving the 'semantic' logger's records from WARNING up.

    The settings stop that logger propagating to the root logger, where
    caplog listens; lower the level with ``caplog.set_level`` for more.
    """
    monkeypatch.setattr(logging.getLogger("semantic"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="semantic")
    return caplog


def unique_text(text):
    """``text`` made unique: the embedding cache outlives tests and test runs,
    and a text it holds would be found there instead of encoded."""
    return f"{text} {uuid.uuid4()}"


def pending(target):
    """Rows a worker would claim now of ``target``: a slot, or a field's declared slot (semantic.status's definition)."""
    from semantic.worker import as_slot

    return as_slot(target).count_statuses()["pending"]


def embed_until_idle(target):
    """Run the worker here on ``target`` (a slot, or a field's declared slot) until nothing of it is pending.

    Rows the session's Celery worker holds, if it runs, are waited for.
    """
    from semantic.worker import embed_stale_rows

    wait_until(lambda: embed_stale_rows(target, time_budget=600).claimed == 0 and pending(target) == 0, message=f"{target} embedded")


def other_connection():
    """A psycopg connection of its own to the test database, in autocommit: another process's view and writes."""
    import psycopg
    from django.db import connection

    config = connection.settings_dict
    return psycopg.connect(
        dbname=config["NAME"], user=config["USER"], host=config["HOST"], port=config["PORT"] or None, autocommit=True
    )


def store_as_fresh(rows, vectors):
    """Give saved rows known vectors as if the worker had embedded their texts (a test shortcut).

    Saves never write vectors (only the worker does), so tests that need
    thousands of rows with chosen vectors write them here, with the source
    hash each row's save computed as their vector hash.
    """
    model = type(rows[0])
    field = model._meta.get_field("embedding")
    for row, vector in zip(rows, vectors):
        setattr(row, field.attname, vector)
        setattr(row, field.vector_hash_attname, getattr(row, field.source_hash_attname))
    model._base_manager.bulk_update(rows, [field.attname, field.vector_hash_attname], batch_size=1000)


def store_chunks(rows, chunk_vectors):
    """Give saved rows of a chunked field known chunk vectors (``chunk_vectors[i]`` for ``rows[i]``), then ANALYZE.

    Chunk i of a row gets text ``"<pk>#<i>"``. The planner statistics are
    refreshed, and semantic's cached copies of them dropped, so searches see
    the tables as loaded.
    """
    from django.db import connection

    from semantic.retrieval import estimates

    model = type(rows[0])
    chunk_model = model._meta.get_field("embedding").chunk_model
    chunk_model.objects.bulk_create(
        [
            chunk_model(owner=row, index=i, start=i, end=i + 1, text=f"{row.pk}#{i}", text_hash=f"chunk-{row.pk}-{i}", embedding=vector)
            for row, vectors in zip(rows, chunk_vectors)
            for i, vector in enumerate(vectors)
        ],
        batch_size=2000,
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {model._meta.db_table}")
        cursor.execute(f"ANALYZE {chunk_model._meta.db_table}")
    estimates.forget_table_statistics()


def run_admin_action(action, queryset):
    """Run the SemanticAdminMixin action ``action`` on ``queryset``, as the changelist does."""
    from django.contrib import admin
    from django.contrib.messages.storage.fallback import FallbackStorage
    from django.test import RequestFactory

    from semantic import SemanticAdminMixin

    class ModelAdmin(SemanticAdminMixin, admin.ModelAdmin):
        pass

    request = RequestFactory().post("/admin/")
    request.session = {}
    request._messages = FallbackStorage(request)
    getattr(ModelAdmin(queryset.model, admin.site), action)(request, queryset)
