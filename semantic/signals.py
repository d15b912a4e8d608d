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

from semantic.conf import semantic_settings
from semantic.fields import embedding_fields

logger = logging.getLogger("semantic")

WAKE_PREFIX = "semantic:wake:"


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

    Never raises: the rows are stale in the database whatever happens here,
    and the periodic sweep or ``semantic_reindex`` finds them if this
    wake-up is lost (broker down, cache down).
    """
    from semantic import cache as embedding_cache
    from semantic.tasks import embed_stale

    key = wake_key(model, field_name, using)
    cache = embedding_cache.get_cache()
    try:
        if cache is not None and not force and not cache.add(key, 1, timeout=semantic_settings.COALESCE_SECONDS):
            return False
    except Exception:
        logger.warning("semantic: cache unreachable; enqueueing without coalescing", exc_info=True)
    try:
        embed_stale.apply_async(
            args=(model._meta.label, field_name, using),
            queue=semantic_settings.QUEUE,
        )
    except Exception:
        logger.warning(
            "semantic: could not enqueue embedding of %s.%s; the rows stay stale until a worker sweeps them",
            model._meta.label,
            field_name,
            exc_info=True,
        )
        release_wake_key(model, field_name, using)
        return False
    return True


def release_wake_key(model, field_name, using):
    from semantic import cache as embedding_cache

    cache = embedding_cache.get_cache()
    if cache is None:
        return
    try:
        cache.delete(wake_key(model, field_name, using))
    except Exception:
        logger.debug("semantic: could not clear wake key", exc_info=True)
