"""
Wake-ups: telling a worker that a field has pending rows.

A wake-up is one ``semantic.embed_stale`` task message on the embedding
queue. It carries nothing that matters: the rows are pending in PostgreSQL
whatever happens here, and the task claims every pending row it can see. So
a lost wake-up costs time, never data (the next save, the periodic sweep or
``semantic_reindex`` sends another), and a save never waits for a broker
that is down.

Wake-ups are coalesced: the first save of a (model, field) in a window of
COALESCE_SECONDS enqueues one task; later saves find the cache key and
enqueue nothing. The task clears the key before its final look for pending
rows, so a save that lands after that look enqueues a new task.
"""

import logging
from functools import partial

from celery import current_app
from django.db import router, transaction
from kombu import pools

from semantic import cache as embedding_cache
from semantic.conf import semantic_settings

logger = logging.getLogger("semantic")

# The task a wake-up sends, by name: the Celery tasks (semantic.tasks) use
# this module, not the other way round.
EMBED_TASK = "semantic.embed_stale"
WAKE_PREFIX = "semantic:wake:"

# How a wake-up is published. A save must not wait for a broker that is down,
# and a lost wake-up costs little (see the module docstring), so: no retries.
# Measured with the broker's port closed: Celery's default policy (3 retries,
# 0.2 s steps) cost 0.6 s per save; retry=False is worse, 6 s per save in a
# process that has not connected yet, because kombu then connects with its
# own policy (2 s steps within broker_connection_timeout); this policy fails
# in milliseconds.
PUBLISH_RETRY_POLICY = {"max_retries": 0}
# Seconds a wake-up may spend connecting to a Redis broker or waiting for its
# answer. Kombu's Redis transport sets no socket timeout: with the broker's
# host unreachable (packets dropped) a save waited 135 s for the kernel to
# give up connecting.
PUBLISH_TIMEOUT = 0.5


def wake_key(model, field_name, using):
    return f"{WAKE_PREFIX}{using}:{model._meta.label_lower}.{field_name}"


def schedule_embedding(model, field_name, *, using=None):
    """Wake a worker for ``model.field_name`` after the current transaction commits."""
    using = using or router.db_for_write(model)
    transaction.on_commit(partial(enqueue_embedding, model, field_name, using), using=using)


def enqueue_embedding(model, field_name, using="default", *, force=False):
    """Send one embed task unless one was sent in the coalescing window (``force``: send anyway).

    Never raises, and waits for the broker at most PUBLISH_TIMEOUT (for the
    cache, as long as its settings' timeouts say). Returns whether a task
    was sent.
    """
    claimed_key = False
    if not force:
        try:
            claimed_key = embedding_cache.add_flag(wake_key(model, field_name, using), semantic_settings.COALESCE_SECONDS)
        except Exception:
            logger.warning("semantic: cache unreachable; enqueueing without coalescing", exc_info=True)
        else:
            if claimed_key is False:
                return False
    try:
        publish_wake_up((model._meta.label, field_name, using))
    except Exception:
        logger.warning(
            "semantic: could not enqueue embedding of %s.%s; the rows stay stale until a worker sweeps them",
            model._meta.label,
            field_name,
            exc_info=True,
        )
        # Let the next save try again. Only a key this call set: with the
        # cache unreachable, deleting would cost the save a second timeout.
        if claimed_key:
            release_wake_key(model, field_name, using)
        return False
    return True


def publish_wake_up(args):
    """Send the embed task with ``args`` on the embedding queue, without retries; raises when the broker fails.

    On Redis the message goes through a producer pool of its own whose
    connections time out after PUBLISH_TIMEOUT: the app's pool is left as
    configured, because a worker's connection blocks on reads while it waits
    for tasks. Other transports use the app's pool, whose connect timeout is
    Celery's ``broker_connection_timeout``.
    """
    app = current_app
    options = {"queue": semantic_settings.QUEUE, "retry": True, "retry_policy": PUBLISH_RETRY_POLICY}
    # Not connected yet: only a template for the pool's connections.
    connection = app.connection_for_write(
        connect_timeout=PUBLISH_TIMEOUT,
        transport_options={
            **app.conf.broker_transport_options,
            "socket_connect_timeout": PUBLISH_TIMEOUT,
            "socket_timeout": PUBLISH_TIMEOUT,
        },
    )
    if connection.transport.driver_type != "redis":
        app.send_task(EMBED_TASK, args=args, **options)
        return
    # kombu keeps one pool per broker URL and transport options, per process.
    with pools.producers[connection].acquire(block=True, timeout=PUBLISH_TIMEOUT) as producer:
        app.send_task(EMBED_TASK, args=args, producer=producer, **options)


def release_wake_key(model, field_name, using):
    """Forget the coalescing key, so the next save enqueues a new task."""
    try:
        embedding_cache.delete_key(wake_key(model, field_name, using))
    except Exception:
        logger.debug("semantic: could not clear wake key", exc_info=True)
