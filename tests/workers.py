"""Real Celery worker processes for tests, on the test database and the test Redis.

Each runs ``celery -A project worker`` in a process of its own, on a queue
of the test's own (so the in-thread worker of other tests never takes its
work), and re-enqueues its own follow-up tasks on that queue too.
"""

import os
import signal
import subprocess
import sys
from urllib.parse import quote

from django.conf import settings
from django.db import connection

from project.celery import app


def start_worker_process(name, log_dir, queue, *, redis_url=None, encode_delay=None):
    """Start a worker process consuming ``queue``; its log goes to ``log_dir/<name>.log``.

    ``encode_delay`` (seconds) slows every ``encode()`` call of the worker
    (tests/slow_worker.py), so a test can edit a row while it is encoded.
    """
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        "REDIS_URL": redis_url or settings.REDIS_URL,
        "SEMANTIC_TEST_QUEUE": queue,
    }
    program = [sys.executable, "-m", "celery"]
    if encode_delay:
        program = [sys.executable, "-m", "tests.slow_worker"]
        env["SEMANTIC_TEST_ENCODE_DELAY"] = str(encode_delay)
    log = open(log_dir / f"{name}.log", "w")
    return subprocess.Popen(
        [*program, "-A", "project", "worker", "--pool", "solo", "-Q", queue,
         "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def stop(process):
    """SIGTERM (a warm shutdown: the task in hand finishes), then SIGKILL after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def purge(queue):
    """Drop the task messages waiting on ``queue``."""
    with app.connection_for_write() as broker:
        broker.default_channel.queue_purge(queue)
