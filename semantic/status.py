"""
Where each embedding field stands, read from its hash columns.

``field_status(field)`` counts a field's rows by state in one SQL query and
adds the cache counters of its encoder; ``all_field_statuses()`` does so for
every field a database holds. Both serve logs, monitoring, the system check
semantic.W020 and the ``semantic_status`` command. Nothing here loads a model:
fingerprints come from settings and a digest of the model files.

The states follow the write path's own definition of stale
(``StaleRows.predicate``), so these numbers are what the worker will do:

* ``rows``: all rows; ``with_text``: rows with a source hash (text, or the
  ``'stale'`` marker of an edit whose text only the worker will read);
  ``no_text``: the others, which need no vector;
* ``stale``: rows the worker will embed; ``embedded_fresh``: rows with text
  that are not stale;
* ``missing``: rows with text and no vector at all (new rows, or rows the
  worker could not encode);
* ``other_fingerprint``: rows whose vector was made under another
  fingerprint than the field's current one (another model, model files,
  prefix, normalisation, max_seq_length or chunking). They are stale; until
  they are re-embedded, searches compare new query vectors with old ones.
"""

from django.apps import apps
from django.db import router

from semantic import cache as embedding_cache
from semantic.fields import embedding_fields
from semantic.tasks import StaleRows


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


def count_rows(field, using="default"):
    """A field's rows by state, from one query: a dict of the counts in the module docstring."""
    stale = StaleRows(field, using)
    predicate, predicate_params = stale.predicate()
    has_text = f"{stale.source_hash} IS NOT NULL"
    names = ["rows", "with_text", "stale", "embedded_fresh", "missing", "other_fingerprint"]
    sql = (
        f"SELECT count(*), count(*) FILTER (WHERE {has_text}),"
        f" count(*) FILTER (WHERE {predicate}),"
        # With text, the stale predicate is true or false, never NULL.
        f" count(*) FILTER (WHERE {has_text} AND NOT ({predicate})),"
        f" count(*) FILTER (WHERE {has_text} AND {stale.vector} IS NULL),"
        # NULL (no vector hash) is not counted: no vector, no other fingerprint.
        f" count(*) FILTER (WHERE left({stale.vector_hash}, %s) <> %s)"
        f" FROM {stale.table}"
    )
    fingerprint = field.fingerprint
    params = [*predicate_params, *predicate_params, len(fingerprint), fingerprint]
    with stale.connection.cursor() as cursor:
        cursor.execute(sql, params)
        counts = dict(zip(names, cursor.fetchone()))
    counts["no_text"] = counts["rows"] - counts["with_text"]
    return counts


def field_status(field, using="default"):
    """One field's row counts (see ``count_rows``), fingerprints and cache counters.

    ``fingerprint`` begins the field's row hashes; ``cache`` holds the
    counters of ``encoder_fingerprint``, which begins the cache keys of the
    texts the field's encoder embeds (the two differ for chunked fields).
    """
    encoder_fingerprint = field.encoder.fingerprint
    return {
        "model": field.model._meta.label,
        "field": field.name,
        "model_alias": field.model_alias,
        "fingerprint": field.fingerprint,
        "encoder_fingerprint": encoder_fingerprint,
        **count_rows(field, using),
        "cache": embedding_cache.get_stats(encoder_fingerprint),
    }


def all_field_statuses(using="default"):
    """``field_status`` of every field in database ``using``, keyed by "app_label.Model.field"."""
    return {f"{field.model._meta.label}.{field.name}": field_status(field, using) for field in embedding_fields_on(using)}
