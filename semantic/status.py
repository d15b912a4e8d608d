"""
Embedding status: the one definition of fresh, stale, missing, failed, ...

Every row of an EmbeddingField is in exactly one state, read from its hidden
columns (S = source hash, H = vector hash, F = the field's current
fingerprint; see semantic.fields):

=========== ==================================================================
no text     S is empty and nothing is left to clean up: the row needs no vector
failed      the worker failed MAX_ATTEMPTS times to encode the text of S; set
            aside until its text changes or it is retried
missing     S is set and there is no vector yet
other model the vector was made under another encoder configuration (H does
            not start with F): another model, model files, prefix,
            normalisation, max_seq_length or chunking
fresh       H = S: the vector is the current configuration's encoding of the
            row's current text
stale       anything else: the text changed (or was marked stale) since the
            vector was made, or the text was emptied and the old vector and
            chunks are still to be removed
=========== ==================================================================

*Pending* (what workers claim) is stale, missing and other model. A vector
and its hash are written together, by the worker only, so a row has a vector
exactly when it has a vector hash; the states need not read the vector.

The same definition comes in three forms that agree (the tests check every
combination of column values): ``status_q`` (a ``Q`` for querysets: the admin
filter, the worker's claim, searches), ``embedding_status`` (one instance:
the admin column) and ``count_statuses`` (one query of ``COUNT(*) FILTER``:
``semantic_status``, the system checks, the sweep).

The write side of the same concept is ``stale_mark``: the column values that
make rows pending where their new text is not known in Python. Nothing here
loads a model or talks to Celery.
"""

import functools

from django.apps import apps
from django.db import router
from django.db.models import Case, CharField, Count, F, Q, Value, When
from django.db.models.functions import Concat, Left

from semantic import cache as embedding_cache
from semantic.conf import semantic_settings
from semantic.fields import embedding_fields
from semantic.hashing import FINGERPRINT_LENGTH, forgotten_text_suffix, new_stale_mark

NO_TEXT, FAILED, MISSING, OUTDATED, FRESH, STALE = "no_text", "failed", "missing", "outdated", "fresh", "stale"
STATES = (FRESH, STALE, MISSING, OUTDATED, FAILED, NO_TEXT)
# The states a worker claims rows in.
PENDING = (STALE, MISSING, OUTDATED)

LABELS = {
    FRESH: "fresh",
    STALE: "stale",
    MISSING: "missing",
    OUTDATED: "other model",
    FAILED: "failed",
    NO_TEXT: "no text",
}
DESCRIPTIONS = {
    FRESH: "The vector is the current model's encoding of the row's current text.",
    STALE: "The text changed (or was marked stale) since the vector was made; a worker will re-embed it.",
    MISSING: "The row has text but no vector yet; a worker will embed it.",
    OUTDATED: "The vector was made by another model or other settings; a worker will re-embed it. "
    "Searches leave it out meanwhile.",
    FAILED: "The worker could not encode this text; it is set aside until the text changes or it is retried.",
    NO_TEXT: "The row's source text is empty: it needs no vector.",
}


def max_attempts():
    return semantic_settings.MAX_ATTEMPTS


def _failed_q(field):
    # Only a failure recorded for the row's current source hash counts:
    # any new text or mark (a new S) makes the record moot.
    return Q(**{field.failed_hash_attname: F(field.source_hash_attname), f"{field.attempts_attname}__gte": max_attempts()})


def status_q(field, state):
    """A Q selecting the rows of ``field`` in ``state`` (the definition in the module docstring)."""
    source, vector_hash = field.source_hash_attname, field.vector_hash_attname
    has_text = Q(**{f"{source}__isnull": False})
    has_vector = Q(**{f"{vector_hash}__isnull": False})
    current = Q(**{f"{vector_hash}__startswith": field.fingerprint})
    matches = Q(**{vector_hash: F(source)})
    failed = _failed_q(field)
    if state == NO_TEXT:
        return ~has_text & ~has_vector
    if state == FAILED:
        return has_text & failed
    # Django's negation of a lookup on nullable columns keeps the rows where
    # a column is NULL, so ~failed holds for rows that never failed.
    unfailed = has_text & ~failed
    if state == MISSING:
        return unfailed & ~has_vector
    if state == OUTDATED:
        return unfailed & has_vector & ~current
    if state == FRESH:
        return unfailed & current & matches
    if state == STALE:
        return (~has_text & has_vector) | (unfailed & current & ~matches)
    raise ValueError(f"Unknown embedding status {state!r}; one of {', '.join(STATES)}.")


def pending_q(field):
    """A Q for the rows a worker claims: stale, missing or made by another model."""
    q = Q()
    for state in PENDING:
        q |= status_q(field, state)
    return q


def searchable_q(field):
    """A Q for the rows a search may compare with a query vector.

    Rows with text whose vector was made under the field's current
    configuration: fresh rows, and stale ones with the vector of their
    previous text (a search does not lose a row while a worker catches up
    with an edit). Left out: vectors of another configuration (they live in
    another space), rows whose text was emptied, and failed rows (their
    vector, if any, is of a text they no longer have, and no worker will
    catch up).
    """
    return Q(
        **{
            f"{field.source_hash_attname}__isnull": False,
            f"{field.attname}__isnull": False,
            f"{field.vector_hash_attname}__startswith": field.fingerprint,
        }
    ) & ~_failed_q(field)


def embedding_status(field, obj):
    """The state of ``obj`` for ``field`` (the definition in the module docstring)."""
    source = getattr(obj, field.source_hash_attname)
    vector_hash = getattr(obj, field.vector_hash_attname)
    if source is None:
        return NO_TEXT if vector_hash is None else STALE
    if getattr(obj, field.failed_hash_attname) == source and getattr(obj, field.attempts_attname) >= max_attempts():
        return FAILED
    if vector_hash is None:
        return MISSING
    if not vector_hash.startswith(field.fingerprint):
        return OUTDATED
    return FRESH if vector_hash == source else STALE


def failure(field, obj):
    """``(attempts, error)`` of the last failure to encode ``obj``'s current text, or None."""
    source = getattr(obj, field.source_hash_attname)
    if source is None or getattr(obj, field.failed_hash_attname) != source:
        return None
    return getattr(obj, field.attempts_attname), getattr(obj, field.error_attname)


def count_statuses(field, queryset=None, using="default", state_q=None):
    """Rows of ``field`` per state, in one query.

    ``queryset`` (default: every row of ``using``) narrows the rows counted;
    ``state_q`` (default: ``status_q`` of ``field``) gives each state's Q
    (a next slot's, semantic.slots). Returns ``{state: count for each of
    STATES, "rows": all, "pending": the states a worker claims,
    "with_text": all but no text}``.
    """
    if queryset is None:
        queryset = field.model._base_manager.using(using)
    if state_q is None:
        state_q = functools.partial(status_q, field)
    counts = queryset.order_by().aggregate(
        rows=Count("pk"), **{state: Count("pk", filter=state_q(state)) for state in STATES}
    )
    counts["pending"] = sum(counts[state] for state in PENDING)
    counts["with_text"] = counts["rows"] - counts[NO_TEXT]
    return counts


def failures(field, using="default", limit=5):
    """Up to ``limit`` failed rows: ``[(pk, attempts, error)]``, most attempts first."""
    rows = (
        field.model._base_manager.using(using)
        .filter(status_q(field, FAILED))
        .order_by(f"-{field.attempts_attname}", "pk")
        .values_list("pk", field.attempts_attname, field.error_attname)
    )
    return list(rows[:limit])


def stale_mark(field, *, forget_vectors=False):
    """Column values for ``QuerySet.update()`` that make rows pending.

    For writes whose new text is not known in Python (``update()``,
    ``mark_stale()``, ``save(update_fields=...)``, the rehash sweep): the
    source hash becomes a mark no other write repeats (semantic.hashing), so
    a worker that read the row's text before this write cannot store that
    text's vector afterwards, and a failure recorded for the old text no
    longer counts (the row is tried again). Rows without text are marked
    too: the worker reads their text and clears them if it is empty.

    ``forget_vectors``: the vector hash is also replaced by one that keeps
    its fingerprint (so searches treat the vector as before) but matches no
    text, so the worker encodes the text again instead of confirming the
    vector it has (``semantic_reindex --force``).
    """
    values = {
        field.source_hash_attname: new_stale_mark(),
        field.failed_hash_attname: None,
        field.attempts_attname: 0,
        field.error_attname: None,
    }
    if forget_vectors:
        vector_hash = field.vector_hash_attname
        values[vector_hash] = Case(
            When(
                **{f"{vector_hash}__isnull": False},
                then=Concat(Left(vector_hash, FINGERPRINT_LENGTH), Value(forgotten_text_suffix())),
            ),
            default=Value(None),
            output_field=CharField(),
        )
    return values


def stale_marks(fields):
    """``stale_mark`` of each of ``fields`` (of one model), in one dict for one ``update()``."""
    values = {}
    for field in fields:
        values.update(stale_mark(field))
    return values


def embedding_fields_on(using="default", app_configs=None):
    """The EmbeddingFields whose tables live in database ``using``.

    Proxy models are skipped (their table is their concrete model's), and so
    are models the routers keep out of ``using``. ``app_configs`` limits the
    search to those apps, as system checks do.
    """
    models = apps.get_models() if app_configs is None else [m for config in app_configs for m in config.get_models()]
    return [
        field
        for model in models
        if not model._meta.proxy and router.allow_migrate_model(using, model)
        for field in embedding_fields(model)
    ]


def field_status(field, using="default"):
    """One field's counts (see ``count_statuses``), fingerprints and cache counters.

    ``fingerprint`` begins the field's row hashes; ``cache`` holds the
    counters of ``encoder_fingerprint``, which begins the cache keys of the
    texts the field's encoder embeds (the two differ for chunked fields).
    Computes fingerprints from settings and model files; loads no model.
    """
    encoder_fingerprint = field.encoder.fingerprint
    return {
        "model": field.model._meta.label,
        "field": field.name,
        "model_alias": field.model_alias,
        "fingerprint": field.fingerprint,
        "encoder_fingerprint": encoder_fingerprint,
        **count_statuses(field, using=using),
        "cache": embedding_cache.get_stats(encoder_fingerprint),
    }


def all_field_statuses(using="default"):
    """``field_status`` of every field in database ``using``, keyed by "app_label.Model.field"."""
    return {f"{field.model._meta.label}.{field.name}": field_status(field, using) for field in embedding_fields_on(using)}
