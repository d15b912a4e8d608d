"""
Celery tasks: claim stale rows, encode them in batches, write the vectors back.

A claim is a transaction that takes a transaction-scoped advisory lock per
row with ``pg_try_advisory_xact_lock``, skipping rows another worker holds
(the same effect as ``FOR UPDATE SKIP LOCKED``) while taking *no* row lock:
a user saving a row that is being encoded is never blocked by the worker.
The locks vanish with the transaction, so a killed worker leaves nothing
claimed. The write-back only touches rows whose source hash is still the one
that was encoded; a row edited meanwhile stays stale and is encoded again.

For a chunked field (the default) each row's text is split into token
windows (semantic.chunking); the windows are what is looked up in the cache
and encoded, the row's vector is their token-weighted mean, and the rows
written get their chunks replaced in the same transaction.
"""

import logging
import time
import zlib

from celery import shared_task
from celery.signals import worker_process_init, worker_ready
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q

from semantic import cache as embedding_cache
from semantic.conf import semantic_settings
from semantic.distances import vector_literal
from semantic.fields import EmbeddingField
from semantic.signals import enqueue_embedding, release_wake_key

logger = logging.getLogger("semantic")

# Chunk rows per INSERT statement.
CHUNK_INSERT_BATCH = 500


def resolve_field(model_label, field_name):
    """The EmbeddingField named by a task's arguments, or a clear error."""
    try:
        model = apps.get_model(model_label)
    except (LookupError, ValueError) as exc:
        raise ImproperlyConfigured(f"Unknown model {model_label!r}.") from exc
    field = next((f for f in model._meta.get_fields() if f.name == field_name), None)
    if not isinstance(field, EmbeddingField):
        raise ImproperlyConfigured(f"{model_label}.{field_name} is not an EmbeddingField.")
    return field


def _lock_namespace(field):
    """A stable int4 per (table, field) for the advisory lock's first key."""
    value = zlib.crc32(f"{field.model._meta.db_table}.{field.column}".encode())
    return value - 2**32 if value >= 2**31 else value


class StaleRows:
    """SQL for one embedding field's stale rows (the write path's queries)."""

    def __init__(self, field, using):
        self.field = field
        self.using = using
        self.connection = connections[using]
        meta = field.model._meta
        qn = self.connection.ops.quote_name
        self.table = qn(meta.db_table)
        self.pk = qn(meta.pk.column)
        self.pk_type = meta.pk.db_type(self.connection)
        self.vector = qn(field.column)
        self.source_hash = qn(meta.get_field(field.source_hash_attname).column)
        self.vector_hash = qn(meta.get_field(field.vector_hash_attname).column)
        chunk_model = field.chunk_model
        if chunk_model is not None:
            self.chunk_table = qn(chunk_model._meta.db_table)
            self.chunk_owner = qn(chunk_model._meta.get_field("owner").column)

    def predicate(self):
        """SQL and params true for a stale row.

        Stale: has text, and its vector is missing, made from another text,
        or made (or hashed) under another fingerprint (the field's: the
        encoder's, plus the chunking for a chunked field). For a chunked
        field, a row without text that still has chunks is stale too: a save
        emptied it, and the worker deletes its chunks.
        """
        fingerprint = self.field.fingerprint
        sql = (
            f"{self.source_hash} IS NOT NULL AND ({self.vector_hash} IS NULL"
            f" OR {self.vector_hash} <> {self.source_hash}"
            f" OR left({self.source_hash}, %s) <> %s)"
        )
        if self.field.chunk_model is not None:
            # The outer reference inside the subquery keeps PostgreSQL from
            # hashing the whole chunk table (a hashed SubPlan): each row
            # without text costs one probe of the (owner, index) index.
            sql = (
                f"({sql}) OR ({self.source_hash} IS NULL AND EXISTS (SELECT 1 FROM {self.chunk_table}"
                f" WHERE {self.chunk_table}.{self.chunk_owner} = {self.table}.{self.pk}"
                f" AND {self.table}.{self.source_hash} IS NULL))"
            )
        return sql, [len(fingerprint), fingerprint]

    def claim(self, limit, skip=()):
        """Lock up to ``limit`` stale rows for this transaction; returns {pk: source_hash}.

        Rows whose pk is in ``skip`` (failed earlier in this task) are passed over.
        """
        predicate, params = self.predicate()
        if skip:
            predicate = f"({predicate}) AND NOT ({self.pk}::text = ANY(%s))"
            params.append([str(pk) for pk in skip])
        # OFFSET 0 keeps the stale filter inside the subquery, so locks are
        # tried only on stale rows; no ORDER BY, so the scan stops at LIMIT.
        sql = (
            f"SELECT pk, source_hash FROM ("
            f"SELECT {self.pk} AS pk, {self.source_hash} AS source_hash FROM {self.table}"
            f" WHERE {predicate} OFFSET 0) AS stale"
            f" WHERE pg_try_advisory_xact_lock(%s, hashtext(pk::text)) LIMIT %s"
        )
        with self.connection.cursor() as cursor:
            cursor.execute(sql, [*params, _lock_namespace(self.field), limit])
            return dict(cursor.fetchall())

    def count(self):
        predicate, params = self.predicate()
        with self.connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {self.table} WHERE {predicate}", params)
            return cursor.fetchone()[0]

    def write(self, rows):
        """Write (pk, claimed_hash, new_hash, vector_text_or_None) rows; returns rows updated."""
        return len(self.write_returning_pks(rows))

    def write_returning_pks(self, rows):
        """Write (pk, claimed_hash, new_hash, vector_text_or_None) rows; returns the pks written.

        A row is written only if its source hash still equals the claimed
        one. ``new_hash`` None clears the row (its text became empty).
        """
        if not rows:
            return []
        values = ", ".join([f"(CAST(%s AS {self.pk_type}), %s, %s, CAST(%s AS vector))"] * len(rows))
        params = [value for row in rows for value in row]
        sql = (
            f"UPDATE {self.table} AS t SET {self.vector} = v.vec,"
            f" {self.vector_hash} = v.new_hash, {self.source_hash} = v.new_hash"
            f" FROM (VALUES {values}) AS v(pk, claimed, new_hash, vec)"
            f" WHERE t.{self.pk} = v.pk AND t.{self.source_hash} IS NOT DISTINCT FROM v.claimed"
            f" RETURNING t.{self.pk}"
        )
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return [row[0] for row in cursor.fetchall()]

    def confirm(self, rows):
        """Set the source hash of (pk, claimed_hash, new_hash) rows whose vector already fits.

        For rows marked stale (update(), mark_stale(), a reindex) whose text
        turned out unchanged: the vector and chunks stay, nothing is encoded
        or rewritten. Guarded like ``write``. Returns the rows updated.
        """
        if not rows:
            return 0
        values = ", ".join([f"(CAST(%s AS {self.pk_type}), %s, %s)"] * len(rows))
        sql = (
            f"UPDATE {self.table} AS t SET {self.source_hash} = v.new_hash"
            f" FROM (VALUES {values}) AS v(pk, claimed, new_hash)"
            f" WHERE t.{self.pk} = v.pk AND t.{self.source_hash} IS NOT DISTINCT FROM v.claimed"
            f" AND t.{self.vector_hash} = v.new_hash"
        )
        with self.connection.cursor() as cursor:
            cursor.execute(sql, [value for row in rows for value in row])
            return cursor.rowcount

    def replace_chunks(self, pks, chunks):
        """Give the rows ``pks`` exactly the chunks in ``chunks`` ({pk: [(Chunk, hash, vector)]}).

        Old chunks of those rows are deleted (all of them for a row missing
        from ``chunks``: its text became empty), the new ones inserted.
        """
        if not pks:
            return
        with self.connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {self.chunk_table} WHERE {self.chunk_owner} = ANY(%s)", [list(pks)])
        meta = self.field.chunk_model._meta
        qn = self.connection.ops.quote_name
        columns = ", ".join(qn(meta.get_field(name).column) for name in ("owner", "index", "start", "end", "text", "text_hash", "embedding"))
        rows = [
            (pk, chunk.index, chunk.start, chunk.end, chunk.text, text_hash, vector_literal(vector))
            for pk in pks
            for chunk, text_hash, vector in chunks.get(pk, ())
        ]
        placeholder = "(%s, %s, %s, %s, %s, %s, CAST(%s AS vector))"
        with self.connection.cursor() as cursor:
            for start in range(0, len(rows), CHUNK_INSERT_BATCH):
                batch = rows[start : start + CHUNK_INSERT_BATCH]
                cursor.execute(
                    f"INSERT INTO {qn(meta.db_table)} ({columns}) VALUES {', '.join([placeholder] * len(batch))}",
                    [value for row in batch for value in row],
                )


def embed_batch(field, using="default", claim_size=None, skip=()):
    """Claim up to ``claim_size`` (default CLAIM_SIZE) rows, encode, write back.

    Returns ``(claimed, written, failed_pks)``. Each row's text is split into
    pieces: token windows for a chunked field, the whole text otherwise.
    Pieces found in the hashed-text cache are not encoded; the rest are
    encoded in one ``encode()`` call, which sorts them by length so batches
    carry little padding. A row's vector is its pieces' token-weighted mean
    (the piece's own vector when there is one). Rows with a piece that could
    not be encoded (out of memory even alone) are left stale and returned in
    ``failed_pks``.
    """

    from semantic.chunking import weighted_mean

    encoder = field.encoder
    stale = StaleRows(field, using)
    with transaction.atomic(using=using):
        claimed = stale.claim(claim_size or semantic_settings.CLAIM_SIZE, skip)
        if not claimed:
            return 0, 0, []
        # The stored vector is never read here; parsing it would cost more
        # than the rest of the row.
        has_vector = ExpressionWrapper(Q(**{f"{field.attname}__isnull": False}), output_field=BooleanField())
        instances = (
            field.model._base_manager.using(using)
            .defer(field.attname)
            .annotate(_semantic_has_vector=has_vector)
            .in_bulk(list(claimed))
        )
        texts = {pk: field.build_text(obj) for pk, obj in instances.items()}
        # Marked stale but unchanged (update() of another column, a reindex):
        # the vector already belongs to this text.
        # Each text hashed once: it decides "unchanged" here and is the new
        # source hash written below.
        row_hashes = {pk: field.text_hash(text) for pk, text in texts.items() if text}
        unchanged = []
        for pk, row_hash in row_hashes.items():
            obj = instances[pk]
            if obj._semantic_has_vector and getattr(obj, field.vector_hash_attname) == row_hash:
                unchanged.append((pk, claimed[pk], row_hash))
                del instances[pk], texts[pk]
        confirmed = stale.confirm(unchanged)
        pieces = _split(field, {pk: text for pk, text in texts.items() if text})
        keys = {pk: [encoder.text_hash(piece.text) for piece in row_pieces] for pk, row_pieces in pieces.items()}
        vectors = embedding_cache.get_vectors(sorted({key for row_keys in keys.values() for key in row_keys}))
        missing = {}
        for pk, row_keys in keys.items():
            for key, piece in zip(row_keys, pieces[pk]):
                if key not in vectors:
                    missing[key] = piece.text
        missing = sorted(missing.items(), key=lambda item: len(item[1]))
        failed_keys = set()
        if missing:
            field.verify_encoder()
            encoded, failed = encoder.encode([text for _, text in missing])
            failed_keys = {missing[i][0] for i in failed}
            fresh = {key: vector for (key, _), vector in zip(missing, encoded) if vector is not None}
            embedding_cache.set_vectors(fresh)
            vectors.update(fresh)
        rows = []
        chunks = {}
        failed_pks = []
        normalize = bool(encoder.config["normalize"])
        for pk in instances:
            if pk not in pieces:
                rows.append((pk, claimed[pk], None, None))
                continue
            if failed_keys.intersection(keys[pk]):
                failed_pks.append(pk)
                continue
            row_vectors = [vectors[key] for key in keys[pk]]
            vector = weighted_mean(row_vectors, [piece.tokens for piece in pieces[pk]], normalize)
            rows.append((pk, claimed[pk], row_hashes[pk], vector_literal(vector)))
            chunks[pk] = list(zip(pieces[pk], keys[pk], row_vectors))
        written = stale.write_returning_pks(rows)
        if field.chunk_model is not None:
            stale.replace_chunks(written, chunks)
    if failed_pks:
        logger.error("semantic: %s.%s rows %s could not be encoded and stay stale", field.model._meta.label, field.name, failed_pks)
    return len(claimed), len(written) + confirmed, failed_pks


def _split(field, texts):
    """{pk: [Chunk]} for {pk: text}: token windows for a chunked field, else the whole text."""
    from semantic.chunking import Chunk, Chunker

    if field.chunk_model is None:
        return {pk: [Chunk(0, 0, len(text), text, 1)] for pk, text in texts.items()}
    if not texts:
        return {}
    # Splitting needs the model's tokenizer, so the model is loaded here.
    field.verify_encoder()
    chunker = Chunker(field.encoder, field.overlap)
    return {pk: chunker.split(text) for pk, text in texts.items()}


def embed_stale_rows(field, using="default", *, time_budget=None, claim_size=None):
    """Embed stale rows of ``field`` until none can be claimed or time runs out.

    Returns a dict with the rows claimed, written and failed, and whether
    work was left over because the time budget ran out. Rows that fail are
    not claimed again by the same call, so one bad row cannot spin a worker.
    """
    deadline = time.monotonic() + (time_budget if time_budget is not None else semantic_settings.TASK_TIME_BUDGET)
    totals = {"claimed": 0, "written": 0, "failed": [], "out_of_time": False}
    while True:
        claimed, written, failed = embed_batch(field, using, claim_size, skip=totals["failed"])
        totals["claimed"] += claimed
        totals["written"] += written
        totals["failed"].extend(failed)
        if not claimed:
            return totals
        if time.monotonic() >= deadline:
            totals["out_of_time"] = True
            return totals


@shared_task(name="semantic.embed_stale", acks_late=True, ignore_result=True)
def embed_stale(model_label, field_name, using="default"):
    """Embed every stale row of one (model, field); the coalesced wake-up target."""
    field = resolve_field(model_label, field_name)
    totals = embed_stale_rows(field, using)
    if totals["out_of_time"]:
        enqueue_embedding(field.model, field_name, using, force=True)
    else:
        # Clear the coalescing key, then look once more: a save that found
        # the key set between our last claim and now enqueued nothing.
        release_wake_key(field.model, field_name, using)
        more = embed_stale_rows(field, using)
        totals["claimed"] += more["claimed"]
        totals["written"] += more["written"]
        totals["failed"].extend(more["failed"])
        if more["out_of_time"]:
            enqueue_embedding(field.model, field_name, using, force=True)
    logger.info("semantic: %s.%s embedded %d row(s)", model_label, field_name, totals["written"])
    return totals


def warm_up():
    """Load every encoder some EmbeddingField uses, so the first task is not slow."""
    from semantic.encoders import get_encoder
    from semantic.fields import embedding_fields

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


def rehash_rows(field, using="default", page_size=1000):
    """Re-hash every row's text and mark rows whose text changed behind the ORM.

    Pages by primary key (keyset, not OFFSET), so memory stays flat and the
    cost stays linear on large tables. Returns the number of rows corrected.
    Catches edits made with raw SQL or by other programs.
    """
    model = field.model
    manager = model._base_manager.using(using)
    sources = field.source_names() if not callable(field.source) else None
    # Load only what the text needs (all fields for a callable or a property).
    only = None
    if sources and all(_is_concrete(model, name) for name in sources):
        only = ["pk", field.source_hash_attname, *sources]
    corrected = 0
    last_pk = None
    while True:
        page = manager.order_by("pk")
        if last_pk is not None:
            page = page.filter(pk__gt=last_pk)
        if only:
            page = page.only(*only)
        rows = list(page[:page_size])
        if not rows:
            return corrected
        for row in rows:
            new_hash = field.compute_source_hash(row)
            if new_hash != getattr(row, field.source_hash_attname):
                corrected += manager.filter(pk=row.pk).update(**field.source_hash_update(new_hash))
        last_pk = rows[-1].pk


def _is_concrete(model, name):
    from django.core.exceptions import FieldDoesNotExist

    try:
        return model._meta.get_field(name).concrete
    except FieldDoesNotExist:
        return False


@shared_task(name="semantic.sweep", ignore_result=True)
def sweep(rehash=False, using="default"):
    """Wake workers for stale rows nothing woke; with ``rehash``, first find raw-SQL edits.

    Meant for Celery beat: every few minutes without ``rehash`` (one count
    query per field), nightly with it (reads every row). Returns
    {"model.field": stale rows}. Schedule::

        CELERY_BEAT_SCHEDULE = {
            "semantic-sweep": {"task": "semantic.sweep", "schedule": 300.0},
            "semantic-rehash": {"task": "semantic.sweep", "schedule": 86400.0,
                                "kwargs": {"rehash": True}},
        }
    """
    from semantic.fields import embedding_fields

    report = {}
    for model in apps.get_models():
        for field in embedding_fields(model):
            if rehash:
                rehash_rows(field, using)
            stale = StaleRows(field, using).count()
            report[f"{model._meta.label}.{field.name}"] = stale
            if stale:
                # Forced: a lost wake-up may have left its coalescing key behind.
                enqueue_embedding(model, field.name, using, force=True)
    return report

