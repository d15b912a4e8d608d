"""
Shared fixtures. Everything is real: the embedded PostgreSQL with pgvector
and a local redis-server (both started by the project settings), a Celery
worker consuming the real broker, and models loaded by sentence-transformers.
"""

import os
import time

# Before anything imports huggingface_hub: a hub name must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tiny_model():
    """The tiny random bi-encoder the 'tiny' alias points at."""
    from django.conf import settings

    from tests.modelfactory import build_tiny_model

    return build_tiny_model(settings.TINY_MODEL_DIR, dimensions=settings.TINY_DIMENSIONS)


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

    with django_db_blocker.unblock():
        with start_worker(
            app,
            pool="solo",
            perform_ping_check=False,
            queues=[settings.SEMANTIC.get("QUEUE", "semantic"), "celery"],
            shutdown_timeout=30,
        ) as worker:
            yield worker


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
