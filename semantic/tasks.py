"""
Celery tasks: the embedding wake-up target, the periodic sweep, and warming
the models when a worker starts. The work itself is semantic.worker's.
"""

import logging
import time

from celery import shared_task
from celery.signals import worker_process_init, worker_ready
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import InterfaceError, OperationalError, connections

from semantic.conf import semantic_settings
from semantic.encoders import get_encoder
from semantic.fields import embedding_fields, get_embedding_field
from semantic.rehash import rehash_rows
from semantic.status import embedding_fields_on
from semantic.switching import filling_slots
from semantic.wakeups import enqueue_embedding, release_wake_key
from semantic.worker import EmbedResult, embed_stale_rows

logger = logging.getLogger("semantic")

# Seconds between a task's tries after its database connection failed. A
# worker keeps its connection between tasks (CONN_MAX_AGE), so a PostgreSQL
# restart or failover while it waits leaves the next task a dead connection:
# that task reconnects and tries again, instead of failing and leaving the
# rows to the periodic sweep minutes later. About 15 s in all; a database
# down for longer is the sweep's to catch up on.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def field_from_label(model_label, field_name):
    """The EmbeddingField a task's arguments name; ImproperlyConfigured when there is none."""
    try:
        model = apps.get_model(model_label)
    except (LookupError, ValueError) as exc:
        raise ImproperlyConfigured(f"Unknown model {model_label!r}.") from exc
    return get_embedding_field(model, field_name)


@shared_task(name="semantic.embed_stale", acks_late=True, ignore_result=True)
def embed_stale(model_label, field_name, using="default"):
    """Embed every pending row of one (model, field); the coalesced wake-up target.

    A failed database connection is closed and the work tried again after
    each of RECONNECT_DELAYS; what a try committed stays (claims are per
    row), so a retry only does what is still pending.
    """
    field = field_from_label(model_label, field_name)
    for delay in RECONNECT_DELAYS:
        try:
            return _embed_pending(field, using)
        except (OperationalError, InterfaceError):
            logger.warning(
                "semantic: database connection failed while embedding %s.%s; reconnecting in %.1fs",
                model_label, field_name, delay, exc_info=True,
            )
            connections[using].close()
            time.sleep(delay)
    return _embed_pending(field, using)


def _embed_pending(field, using):
    """Embed the pending rows of every slot the field has (semantic.switching: the live one first)."""
    model_label, field_name = field.model._meta.label, field.name
    slots = filling_slots(field, using)
    totals, failed = EmbedResult(), {}
    # One time budget for the task, whatever the number of slots.
    deadline = time.monotonic() + semantic_settings.TASK_TIME_BUDGET
    for slot in slots:
        result = embed_stale_rows(slot, using, time_budget=max(0.0, deadline - time.monotonic()))
        totals.add(result)
        failed[slot] = result.failed
        if result.out_of_time:
            break
    if not totals.out_of_time:
        # Clear the coalescing key, then look once more: a save that found
        # the key set between our last claim and now enqueued nothing. Rows
        # that failed in this task are not tried again by it.
        release_wake_key(field.model, field_name, using)
        for slot in slots:
            totals.add(embed_stale_rows(slot, using, skip=failed[slot]))
    if totals.out_of_time:
        enqueue_embedding(field.model, field_name, using, force=True)
    logger.info(
        "semantic: %s.%s: %d row(s) embedded, %d confirmed unchanged, %d cleared, %d failed",
        model_label, field_name, totals.embedded, totals.confirmed, totals.cleared, len(totals.failed),
    )
    return totals.written


def warm_up():
    """Load every encoder some EmbeddingField uses, so the first task is not slow."""
    aliases = {field.model_alias for model in apps.get_models() for field in embedding_fields(model)}
    for alias in sorted(aliases):
        try:
            get_encoder(alias).model
        except Exception:
            logger.exception("semantic: could not load model %r at worker start", alias)


@worker_process_init.connect
def _warm_up_pool_process(**kwargs):
    if semantic_settings.WARM_UP:
        warm_up()


@worker_ready.connect
def _warm_up_worker(sender=None, **kwargs):
    # Prefork children warm themselves (above); loading in the parent would
    # only waste memory. Solo and thread pools run tasks in this process.
    pool = getattr(sender, "pool", None)
    if semantic_settings.WARM_UP and "prefork" not in type(pool).__module__:
        warm_up()


@shared_task(name="semantic.sweep", ignore_result=True)
def sweep(rehash=False, using="default"):
    """Wake workers for pending rows nothing woke; with ``rehash``, first find raw-SQL edits.

    Meant for Celery beat: every few minutes without ``rehash`` (one count
    query per field), nightly with it (reads every row). Returns
    {"model.field": pending rows}. Schedule::

        CELERY_BEAT_SCHEDULE = {
            "semantic-sweep": {"task": "semantic.sweep", "schedule": 300.0},
            "semantic-rehash": {"task": "semantic.sweep", "schedule": 86400.0,
                                "kwargs": {"rehash": True}},
        }
    """
    report = {}
    for field in embedding_fields_on(using):
        if rehash:
            rehash_rows(field, using)
        pending = sum(slot.count_statuses(using)["pending"] for slot in filling_slots(field, using))
        report[f"{field.model._meta.label}.{field.name}"] = pending
        if pending:
            # Forced: a lost wake-up may have left its coalescing key behind.
            enqueue_embedding(field.model, field.name, using, force=True)
    return report
