"""
Save hooks: a save marks its row stale (done by the field) and, once the
transaction commits, wakes a worker. No model is loaded or run here.

Wake-ups are coalesced: the first save of a (model, field) in a window of
COALESCE_SECONDS enqueues one task; later saves find the cache key and
enqueue nothing, because that task claims every stale row it can see. The
worker clears the key before its final look for stale rows, so a save that
lands after that look enqueues a new task.
"""

import logging
from functools import partial

from django.db import router, transaction
from django.db.models.signals import post_save
from kombu import pools

from semantic.conf import semantic_settings
from semantic.fields import embedding_fields

logger = logging.getLogger("semantic")

WAKE_PREFIX = "semantic:wake:"

# How a wake-up is published. A save must not wait for a broker that is down,
# and a lost wake-up costs little (the rows are stale in PostgreSQL; the next
# save or the sweep sends another), so: no retries. Measured with the
# broker's port closed: Celery's default policy (3 retries, 0.2 s steps) cost
# 0.6 s per save; retry=False is worse, 6 s per save in a process that has not
# connected yet, because kombu then connects with its own policy (2 s steps
# within broker_connection_timeout); this policy fails in milliseconds.
PUBLISH_RETRY_POLICY = {"max_retries": 0}
# Seconds a wake-up may spend connecting to a Redis broker or waiting for its
# answer. Kombu's Redis transport sets no socket timeout: with the broker's
# host unreachable (packets dropped) a save waited 135 s for the kernel to
# give up connecting.
PUBLISH_TIMEOUT = 0.5


def wake_key(model, field_name, using):
    return f"{WAKE_PREFIX}{using}:{model._meta.label_lower}.{field_name}"


def connect(model):
    """Install the hooks on one model with embedding fields (called by AppConfig.ready)."""
    post_save.connect(handle_post_save, sender=model, dispatch_uid=f"semantic:{model._meta.label_lower}")


def handle_post_save(sender, instance, update_fields=None, using=None, **kwargs):
    for field in embedding_fields(sender):
        if update_fields is not None and field.name not in update_fields:
            if not field.touched_by(update_fields):
                continue
            _refresh_source_hash(field, instance, using)
        if getattr(instance, field.source_hash_attname) is not None:
            schedule_embedding(sender, field.name, using=using)


def _refresh_source_hash(field, instance, using):
    """save(update_fields=...) skipped the field's pre_save: hash the text now."""
    new_hash = field.compute_source_hash(instance)
    if new_hash == getattr(instance, field.source_hash_attname):
        return
    setattr(instance, field.source_hash_attname, new_hash)
    type(instance)._base_manager.using(using).filter(pk=instance.pk).update(**field.source_hash_update(new_hash))


def schedule_embedding(model, field_name, *, using=None):
    """Wake a worker for ``model.field_name`` after the current transaction commits."""
    using = using or router.db_for_write(model)
    transaction.on_commit(partial(enqueue_embedding, model, field_name, using), using=using)


def enqueue_embedding(model, field_name, using="default", *, force=False):
    """Send one embed task unless one was sent in the coalescing window.

    Never raises, and waits for the broker at most PUBLISH_TIMEOUT (for the
    cache, as long as its settings' timeouts say): the rows are stale in the
    database whatever happens here, and the next save, the periodic sweep or
    ``semantic_reindex`` wakes a worker if this wake-up is lost (broker down,
    cache down). Returns whether a task was sent.
    """
    from semantic import cache as embedding_cache
    from semantic.tasks import embed_stale

    key = wake_key(model, field_name, using)
    cache = embedding_cache.get_cache()
    claimed_key = False
    if cache is not None and not force:
        try:
            claimed_key = cache.add(key, 1, timeout=semantic_settings.COALESCE_SECONDS)
        except Exception:
            logger.warning("semantic: cache unreachable; enqueueing without coalescing", exc_info=True)
        else:
            if not claimed_key:
                return False
    try:
        publish_wake_up(embed_stale, (model._meta.label, field_name, using))
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


def publish_wake_up(task, args):
    """Send ``task`` on the embedding queue without retries; raises when the broker fails.

    On Redis the message goes through a producer pool of its own whose
    connections time out after PUBLISH_TIMEOUT: the app's pool is left as
    configured, because a worker's connection blocks on reads while it waits
    for tasks. Other transports use the app's pool, whose connect timeout is
    Celery's ``broker_connection_timeout``.
    """
    app = task.app
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
        task.apply_async(args=args, **options)
        return
    # kombu keeps one pool per broker URL and transport options, per process.
    with pools.producers[connection].acquire(block=True, timeout=PUBLISH_TIMEOUT) as producer:
        task.apply_async(args=args, producer=producer, **options)


def release_wake_key(model, field_name, using):
    from semantic import cache as embedding_cache

    cache = embedding_cache.get_cache()
    if cache is None:
        return
    try:
        cache.delete(wake_key(model, field_name, using))
    except Exception:
        logger.debug("semantic: could not clear wake key", exc_info=True)
