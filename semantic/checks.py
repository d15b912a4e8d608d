"""
System checks that are not tied to one field (field checks live on
EmbeddingField.check). None of them loads a model.
"""

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, ProgrammingError, connections, transaction

from semantic.conf import directory_alias, semantic_settings
from semantic.status import FAILED, OUTDATED, count_statuses, embedding_fields_on
from semantic.triggers import installed_triggers, missing_triggers, wanted_triggers


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
    if not all(_positive_int(size) for size in sizes):
        errors.append(
            checks.Error(
                f"SEMANTIC['BATCH_SIZE'] must be a positive integer or a dict of them by device type, not {batch_size!r}.",
                id="semantic.E010",
            )
        )
    for name in ("CLAIM_SIZE", "MAX_CHUNKS", "MAX_ATTEMPTS", "QUERY_MAX_CHARS", "MAX_K", "MAX_CANDIDATES", "DIVERSITY_CANDIDATES"):
        value = getattr(semantic_settings, name)
        if not _positive_int(value):
            errors.append(checks.Error(f"SEMANTIC[{name!r}] must be a positive integer, not {value!r}.", id="semantic.E010"))
    threshold = semantic_settings.COLLAPSE_THRESHOLD
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        errors.append(
            checks.Error(
                f"SEMANTIC['COLLAPSE_THRESHOLD'] must be a cosine similarity in (0, 1], not {threshold!r}.",
                hint="It is what collapse=True uses: results at least this similar to a better one are dropped "
                "(0.95 keeps distinct stories on one subject apart on the demo's corpus; 1.0 drops exact copies only).",
                id="semantic.E010",
            )
        )
    return errors


@checks.register("semantic")
def check_caches(app_configs=None, **kwargs):
    """semantic.E014: the cache aliases name Redis caches (see semantic.cache: raw bytes, never pickle)."""
    from django.conf import settings

    from semantic.cache import is_supported

    errors = []
    for name in ("CACHE_ALIAS", "QUERY_CACHE_ALIAS"):
        alias = getattr(semantic_settings, name)
        if alias is None:
            continue
        if alias not in settings.CACHES:
            errors.append(checks.Error(f"SEMANTIC[{name!r}] is {alias!r}, which is not in CACHES.", id="semantic.E014"))
        elif not is_supported(alias):
            errors.append(
                checks.Error(
                    f"SEMANTIC[{name!r}] names cache {alias!r}, a {settings.CACHES[alias]['BACKEND']}: its values are pickled, "
                    "so whoever can write to it could run code in this process.",
                    hint="Point it at a django.core.cache.backends.redis.RedisCache alias (semantic stores raw bytes there), "
                    "or set it to None to run without a cache.",
                    id="semantic.E014",
                )
            )
    return errors


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@checks.register(checks.Tags.database)
def check_embedding_status(app_configs=None, databases=None, **kwargs):
    """semantic.W020 (vectors of another encoder configuration) and W022 (failed rows).

    A database check (``check --database default``, and ``migrate``): it
    counts rows by status with one query per field (semantic.status) and
    computes fingerprints from settings and model files. A database that
    cannot answer (not migrated yet, unreachable) yields no warning rather
    than a crash.
    """
    warnings = []
    for using in databases or ():
        for field in embedding_fields_on(using, app_configs):
            try:
                # A savepoint: a failed query must not break a caller's transaction.
                with transaction.atomic(using=using):
                    counts = count_statuses(field, using=using)
            except ImproperlyConfigured:
                continue  # a broken model alias, which semantic.E002 reports
            except ProgrammingError:
                continue  # this field's table or columns are not migrated yet
            except DatabaseError:
                break  # the database cannot answer: nothing to say about it
            label = f"{field.model._meta.label}.{field.name}"
            if counts[OUTDATED]:
                warnings.append(
                    checks.Warning(
                        f"{counts[OUTDATED]} row(s) of {label} have vectors made under another encoder "
                        f"configuration than the current one; searches leave them out until they are "
                        f"re-embedded: run the worker or semantic_reindex.",
                        hint=(
                            f"Model alias {field.model_alias!r} changed (model files, revision, prefix, "
                            f"normalize, max_seq_length, backend or quantize, or chunking) since these rows "
                            f"were embedded."
                        ),
                        obj=field,
                        id="semantic.W020",
                    )
                )
            if counts[FAILED]:
                warnings.append(
                    checks.Warning(
                        f"{counts[FAILED]} row(s) of {label} failed to embed {semantic_settings.MAX_ATTEMPTS} "
                        f"time(s) and are set aside: searches leave them out.",
                        hint=(
                            "`manage.py semantic_status` shows the errors. Fix the texts (a save retries a "
                            "row whose text changed), or retry them with `manage.py semantic_reindex --failed`."
                        ),
                        obj=field,
                        id="semantic.W022",
                    )
                )
    return warnings


@checks.register(checks.Tags.database)
def check_triggers(app_configs=None, databases=None, **kwargs):
    """semantic.W023: a field whose text follows relations lacks its triggers in the database.

    Without them an edit of a related row leaves the rows that read it
    fresh with their old text's vector until the nightly rehash. They are
    installed by ``migrate``; a database migrated before the field's
    source followed relations has none yet.
    """
    warnings = []
    for using in databases or ():
        connection = connections[using]
        if connection.vendor != "postgresql":
            continue
        try:
            with transaction.atomic(using=using):
                present = installed_triggers(connection)
                wanted = wanted_triggers(connection, using)
        except DatabaseError:
            continue  # the database cannot answer: nothing to say about it
        missing = sorted({trigger.table for trigger in missing_triggers(wanted, present)})
        if missing:
            warnings.append(
                checks.Warning(
                    f"The triggers that mark rows stale when related rows change are missing on "
                    f"{', '.join(missing)} in database {using!r}: edits there leave the rows that read "
                    f"them fresh with their old text's vector until the nightly rehash.",
                    hint="Run `manage.py migrate`: it installs them (semantic.triggers).",
                    id="semantic.W023",
                )
            )
    return warnings


@checks.register(checks.Tags.database)
def check_switches(app_configs=None, databases=None, **kwargs):
    """semantic.E024: a field's switch (semantic.switching) names a model alias the settings no longer have.

    Its worker tasks fail, and once promoted so does every search of the
    field: the query encoder is the alias's.
    """
    from semantic.models import Switch

    errors = []
    for using in databases or ():
        if connections[using].vendor != "postgresql":
            continue
        try:
            with transaction.atomic(using=using):
                switches = list(Switch.objects.using(using).values_list("field", "alias", "live"))
        except DatabaseError:
            continue  # not migrated yet, or down: nothing to say about it
        for field, alias, live in switches:
            if _alias_is_configured(alias):
                continue
            errors.append(
                checks.Error(
                    f"The switch of {field} in database {using!r} names model alias {alias!r}, which "
                    f"neither SEMANTIC['MODELS'] nor MODELS_DIR has: its next slot cannot be filled"
                    + (", and every search of the field fails (it is promoted)." if live else "."),
                    hint=(
                        "Put the alias back (SEMANTIC['MODELS'] or MODELS_DIR), or "
                        + ("roll back (semantic_promote --rollback) and " if live else "")
                        + "cancel it (semantic_prepare --cancel)."
                    ),
                    id="semantic.E024",
                )
            )
    return errors


def _alias_is_configured(alias):
    """Whether ``alias`` is in SEMANTIC["MODELS"] or MODELS_DIR (a broken entry is reported when it loads)."""
    if alias in semantic_settings.MODELS:
        return True
    try:
        return directory_alias(semantic_settings.MODELS_DIR, alias) is not None
    except ImproperlyConfigured:
        return True  # its directory is there, with a manifest that does not parse


def _model_location_problem(config):
    """Why the model of ``config`` cannot load offline, or None. Reads no weights."""
    import os
    from pathlib import Path

    from semantic.encoders import model_location

    try:
        location = model_location(config)
    except ImproperlyConfigured as exc:
        return str(exc)
    path = Path(location)
    if path.is_dir():
        if not any(path.iterdir()):
            return f"{location} is an empty directory."
        return None
    looks_local = path.is_absolute() or location.startswith((".", "~"))
    if config["package"] or looks_local or path.exists():
        return f"{location} is not a model directory."
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{location!r} is a hub id, and HF_HUB_OFFLINE is set: it cannot be downloaded."
    return None


def _valid_model_configs():
    """(alias, config) of every alias whose settings are valid (semantic.E010 reports the others)."""
    try:
        aliases = list(semantic_settings.MODELS)
    except ImproperlyConfigured:
        return
    for alias in aliases:
        try:
            yield alias, semantic_settings.model_config(alias)
        except ImproperlyConfigured:
            continue


@checks.register("semantic")
def check_model_files(app_configs=None, **kwargs):
    """semantic.E011: every model alias (and the reranker) points at something loadable offline."""
    errors = []
    for alias, config in _valid_model_configs():
        problem = _model_location_problem(config)
        if problem:
            errors.append(
                checks.Error(
                    f"Model alias {alias!r} cannot be loaded: {problem}",
                    hint="Point 'path' at a sentence-transformers model directory, or 'package' at an "
                    "installed package that carries one in its 'model' folder.",
                    id="semantic.E011",
                )
            )
    if semantic_settings.RERANKER is not None:
        from semantic.rerank import reranker_config

        try:
            problem = _model_location_problem(reranker_config())
        except ImproperlyConfigured as exc:
            problem = str(exc)
        if problem:
            errors.append(
                checks.Error(
                    f"SEMANTIC['RERANKER'] cannot be loaded: {problem}",
                    hint="Set it to a CrossEncoder directory (or None to turn reranking off).",
                    id="semantic.E012",
                )
            )
    return errors


@checks.register("semantic")
def check_backends(app_configs=None, **kwargs):
    """semantic.E013: every onnx alias can run there: supported modules, a usable export directory.

    Reads modules.json and file modes only: no model is loaded or exported.
    """
    from pathlib import Path

    from semantic import onnx_backend
    from semantic.encoders import model_location
    from semantic.hashing import model_identity

    errors = []
    for alias, config in _valid_model_configs():
        if config["backend"] != "onnx":
            continue
        try:
            location = model_location(config)
        except ImproperlyConfigured:
            continue  # reported by semantic.E011
        problem = onnx_backend.unsupported_modules(location)
        if problem:
            errors.append(
                checks.Error(
                    f"Model alias {alias!r} cannot run on the onnx backend: {problem}.",
                    hint="Use 'backend': 'torch' for this model.",
                    id="semantic.E013",
                )
            )
            continue
        if config["onnx_dir"] is None:
            continue  # the default falls back to the user's cache directory
        directory = Path(config["onnx_dir"]).expanduser()
        key = onnx_backend.export_key(model_identity(location, config["revision"]), config["quantize"])
        if not (directory / f"{key}.onnx").is_file() and not onnx_backend.writable(directory):
            errors.append(
                checks.Error(
                    f"Model alias {alias!r} exports its ONNX model to {directory}, which cannot be written "
                    f"and holds no export of this model.",
                    hint="Point 'onnx_dir' at a writable directory, or leave it out (a folder next to the "
                    "model, else ~/.cache/semantic/onnx).",
                    id="semantic.E013",
                )
            )
    return errors


# pgvector releases that features of this app need.
ITERATIVE_SCAN_VERSION = (0, 8, 0)


@checks.register(checks.Tags.database)
def check_pgvector(app_configs=None, databases=None, **kwargs):
    """semantic.E020 / W021: pgvector is available, and new enough for iterative scans.

    E020 when the server has no pgvector at all (nothing can be stored);
    W021 when the installed version predates 0.8, so a filtered index
    search may return fewer than k rows (set ITERATIVE_SCAN "off" to accept
    that, or upgrade). Not created yet is fine: migrate creates it.
    """
    from django.db import connections

    results = []
    for using in databases or ():
        connection = connections[using]
        if connection.vendor != "postgresql":
            continue
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
                    " EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')"
                )
                installed, available = cursor.fetchone()
        except DatabaseError:
            continue
        if not installed and not available:
            results.append(
                checks.Error(
                    f"Database {using!r} has no pgvector extension available.",
                    hint="Install pgvector on the PostgreSQL server (e.g. the pgvector/pgvector Docker "
                    "image, or the postgresql-NN-pgvector package).",
                    id="semantic.E020",
                )
            )
        elif installed and _version(installed) < ITERATIVE_SCAN_VERSION and semantic_settings.ITERATIVE_SCAN != "off":
            results.append(
                checks.Warning(
                    f"Database {using!r} has pgvector {installed}; iterative index scans need 0.8.0.",
                    hint="Upgrade pgvector (ALTER EXTENSION vector UPDATE), or set "
                    "SEMANTIC['ITERATIVE_SCAN'] = 'off' and accept that a filtered index search may "
                    "return fewer than k rows.",
                    id="semantic.W021",
                )
            )
    return results


def _version(text):
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


@checks.register(checks.Tags.compatibility, deploy=True)
def check_broker(app_configs=None, **kwargs):
    """semantic.W030 (deploy): the Celery broker that carries wake-ups answers.

    Saves never fail without it (rows stay stale in the database), but
    nothing is embedded until a worker hears of them or the sweep runs.
    """
    from celery import current_app

    try:
        with current_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # any transport error means the same thing here
        return [
            checks.Warning(
                f"The Celery broker ({current_app.conf.broker_url or 'not configured'}) is unreachable: {exc}",
                hint="Saves still succeed, but no worker hears of new rows until it is back "
                "(the periodic semantic.sweep catches up). Check CELERY_BROKER_URL.",
                id="semantic.W030",
            )
        ]
    return []
