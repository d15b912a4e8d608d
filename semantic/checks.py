"""
System checks that are not tied to one field (field checks live on
EmbeddingField.check). None of them loads a model.
"""

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, ProgrammingError, transaction

from semantic.conf import semantic_settings


@checks.register("semantic")
def check_settings(app_configs=None, **kwargs):
    """semantic.E010: the SEMANTIC dict and every model alias in it are valid."""
    errors = []
    try:
        aliases = list(semantic_settings.MODELS)
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="See semantic/conf.py for the known keys.", id="semantic.E010")]
    for alias in aliases:
        try:
            semantic_settings.model_config(alias)
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), id="semantic.E010"))
    batch_size = semantic_settings.BATCH_SIZE
    sizes = list(batch_size.values()) if isinstance(batch_size, dict) else [batch_size]
    for name in ("CLAIM_SIZE",):
        sizes.append(getattr(semantic_settings, name))
    if not all(isinstance(size, int) and size >= 1 for size in sizes):
        errors.append(
            checks.Error(
                "SEMANTIC['BATCH_SIZE'] (an int or a dict by device type) and SEMANTIC['CLAIM_SIZE'] "
                f"must be positive integers, not {batch_size!r} / {semantic_settings.CLAIM_SIZE!r}.",
                id="semantic.E010",
            )
        )
    return errors


@checks.register(checks.Tags.database)
def check_vectors_of_other_encoders(app_configs=None, databases=None, **kwargs):
    """semantic.W020: rows whose vectors were made under another encoder configuration.

    A database check (``check --database default``, and ``migrate``): it
    counts rows with one query per field and computes fingerprints from
    settings and model files. A database that cannot answer (not migrated
    yet, unreachable) yields no warning rather than a crash.
    """
    # Imported here, not at the top: status imports the Celery tasks, which
    # AppConfig.ready (which imports this module) has no need to load.
    from semantic.status import count_rows, embedding_fields_on

    warnings = []
    for using in databases or ():
        for field in embedding_fields_on(using, app_configs):
            try:
                # A savepoint: a failed query must not break a caller's transaction.
                with transaction.atomic(using=using):
                    count = count_rows(field, using)["other_fingerprint"]
            except ImproperlyConfigured:
                continue  # a broken model alias, which semantic.E002 reports
            except ProgrammingError:
                continue  # this field's table or columns are not migrated yet
            except DatabaseError:
                break  # the database cannot answer: nothing to say about it
            if count:
                warnings.append(
                    checks.Warning(
                        f"{count} row(s) of {field.model._meta.label}.{field.name} have vectors made under "
                        f"another encoder configuration than the current one; they are stale and will be "
                        f"re-embedded; run the worker or semantic_reindex.",
                        hint=(
                            f"Model alias {field.model_alias!r} changed (model files, revision, prefix, "
                            f"normalize, max_seq_length or chunking) since these rows were embedded. Until "
                            f"they are re-embedded, searches compare new query vectors with old ones."
                        ),
                        obj=field,
                        id="semantic.W020",
                    )
                )
    return warnings
