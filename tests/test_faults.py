"""Faults against real services: workers in their own processes, killed and doubled."""

import os
import signal
import subprocess
import sys
from urllib.parse import quote

import numpy as np
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings

from semantic.encoders import get_encoder
from semantic.signals import enqueue_embedding
from semantic.tasks import StaleRows, sweep
from tests.conftest import wait_until
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True)

# A queue of their own: the in-thread test worker must not take this work.
FAULT_QUEUE = "semantic-faults"


def faults_settings():
    return override_settings(SEMANTIC={**settings.SEMANTIC, "QUEUE": FAULT_QUEUE})


def start_worker_process(name, tmp_path):
    """A real `celery worker` process on the test database and the test Redis."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
    }
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "--pool", "solo", "-Q", FAULT_QUEUE,
         "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stale_count():
    return StaleRows(Note._meta.get_field("embedding"), "default").count()


def assert_every_vector_matches_its_text(sample=25):
    assert stale_count() == 0
    rows = list(Note.objects.order_by("?")[:sample])
    vectors, failed = get_encoder("tiny").encode([Note._meta.get_field("embedding").build_text(r) for r in rows])
    for row, vector in zip(rows, vectors):
        assert row.embedding_vector_hash == row.embedding_source_hash
        assert np.allclose(row.embedding, vector, atol=1e-4)


def make_backlog(count, tag):
    with faults_settings(), transaction.atomic():
        Note.objects.bulk_create([Note(title=f"Backlog row {i} {tag}", body="lorem ipsum " * (i % 7)) for i in range(count)])


def test_two_workers_on_one_backlog_encode_each_text_once(tmp_path, stats_delta, request):
    workers = [start_worker_process(f"twin{i}", tmp_path) for i in range(2)]
    try:
        make_backlog(600, request.node.name)
        with faults_settings():
            for _ in range(4):  # several tasks, so both workers claim at once
                enqueue_embedding(Note, "embedding", force=True)
        wait_until(lambda: stale_count() == 0, timeout=180, message="both workers to drain the backlog")
    finally:
        for worker in workers:
            stop(worker)
    assert stats_delta()["texts_encoded"] == 600
    assert_every_vector_matches_its_text()


def test_worker_killed_mid_batch_loses_nothing(tmp_path, request):
    victim = start_worker_process("victim", tmp_path)
    try:
        make_backlog(3000, request.node.name)
        wait_until(lambda: Note.objects.exclude(embedding=None).exists(), timeout=120, message="the first batch")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        stop(victim)
    left = stale_count()
    assert left > 0, "the worker finished before it was killed; the test proved nothing"
    survivor = start_worker_process("survivor", tmp_path)
    try:
        # The killed task's message stays unacknowledged until the broker's
        # visibility timeout; the periodic sweep is what wakes a worker now.
        with faults_settings():
            sweep()
        wait_until(lambda: stale_count() == 0, timeout=180, message="the survivor to finish the backlog")
    finally:
        stop(survivor)
    assert_every_vector_matches_its_text()
