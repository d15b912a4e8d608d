"""
The embedding pipeline for one field, top-down: claim, read, plan, encode, write.

``embed_batch`` runs it once, in one transaction:

1. **claim** up to CLAIM_SIZE pending rows (``status.pending_q``), each with a
   transaction-scoped advisory lock taken with ``pg_try_advisory_xact_lock``:
   rows another worker holds are skipped (as with ``FOR UPDATE SKIP
   LOCKED``), and *no* row lock is taken, so a user saving a row that is
   being encoded never waits for the model. The locks end with the
   transaction: a killed worker leaves nothing claimed.
2. **read** the claimed rows' texts with their source hashes, in one query.
   The source hash read with a text is the *guard* of every write to that
   row below: a write happens only if the row still holds exactly that
   value. Every write that changes a text also changes the source hash to a
   value no other write repeats (the new text's hash, or a fresh stale
   mark), so a row edited while its old text was being encoded is never
   given the old text's vector: it stays pending and is encoded again.
3. **plan** each row: *clear* it (its text is empty), *confirm* it (its
   vector already belongs to this text: only the hash is written), *fail*
   it (its text cannot be built or split, or has more than ``max_chunks``
   chunks), or *encode* it (split into pieces: token windows for a chunked
   field, the whole text otherwise).
4. **encode** the pieces the hashed-text cache does not hold, sorted by
   length so batches carry little padding, in slices; the time budget is
   checked between slices, and rows whose pieces were not reached are left
   pending (their encoded pieces are in the cache for the next round).
5. **write** each outcome with one guarded ``UPDATE … FROM (VALUES …)``;
   the rows given a vector get their chunks replaced in the same
   transaction. A row whose text fails is recorded (``<field>_failed_hash``,
   ``_attempts``, ``_error``) and set aside after MAX_ATTEMPTS (semantic.status).
"""

import logging
import time
import zlib
from dataclasses import dataclass, field as dataclass_field

from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction

from semantic import cache as embedding_cache
from semantic.chunking import Chunk, Chunker, weighted_mean
from semantic.conf import semantic_settings
from semantic.distances import vector_literal
from semantic.encoders import batch_size_for
from semantic.status import max_attempts, pending_q

logger = logging.getLogger("semantic")

# Chunk rows per INSERT statement.
CHUNK_INSERT_BATCH = 500
# Forward passes per encode() call: the time budget is checked between calls.
PASSES_PER_SLICE = 8
# Longest error message kept per failed row.
ERROR_LENGTH = 1000


@dataclass
class EmbedResult:
    """What one or more rounds did. ``failed`` lists the pks whose failure was recorded."""

    claimed: int = 0
    embedded: int = 0  # given the vector of their current text
    confirmed: int = 0  # their vector already was their text's: hash confirmed, nothing encoded
    cleared: int = 0  # their text is empty: vector and chunks removed
    superseded: int = 0  # edited while they were encoded: left pending, encoded again later
    deferred: int = 0  # not reached before the time budget ran out: left pending
    failed: list = dataclass_field(default_factory=list)
    out_of_time: bool = False

    @property
    def written(self):
        """Rows that left the pending state."""
        return self.embedded + self.confirmed + self.cleared

    def add(self, other):
        for name in ("claimed", "embedded", "confirmed", "cleared", "superseded", "deferred"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.extend(other.failed)
        self.out_of_time = self.out_of_time or other.out_of_time
        return self


@dataclass
class PlannedRow:
    pk: object
    guard: object  # the source hash read with the text
    text_hash: object = None  # the content hash of the text read (None: no text, or unknown)
    pieces: list = dataclass_field(default_factory=list)
    keys: list = dataclass_field(default_factory=list)  # each piece's cache key
    error: str = None


def lock_namespace(field):
    """A stable int4 per (table, field): the first key of the claim's advisory locks."""
    value = zlib.crc32(f"{field.model._meta.db_table}.{field.column}".encode())
    return value - 2**32 if value >= 2**31 else value


# --- 1. claim ------------------------------------------------------------------


def claim(field, using, limit, skip=()):
    """Lock up to ``limit`` pending rows of ``field`` for this transaction; returns their pks.

    Rows whose pk is in ``skip`` (failed earlier in the same task) are
    passed over. The rows are those of ``status.pending_q``; raw SQL only
    adds the locks, which the ORM cannot express.
    """
    pending = field.model._base_manager.db_manager(using).filter(pending_q(field)).order_by()
    if skip:
        pending = pending.exclude(pk__in=list(skip))
    sql, params = pending.values_list("pk").query.get_compiler(using).as_sql()
    # OFFSET 0 keeps the pending filter inside the subquery, so locks are
    # tried only on pending rows; no ORDER BY, so the scan stops at LIMIT.
    claim_sql = (
        f"SELECT pk FROM ({sql} OFFSET 0) AS pending(pk)"
        f" WHERE pg_try_advisory_xact_lock(%s, hashtext(pk::text)) LIMIT %s"
    )
    with connections[using].cursor() as cursor:
        cursor.execute(claim_sql, [*params, lock_namespace(field), limit])
        return [row[0] for row in cursor.fetchall()]


# --- 2. read and 3. plan ---------------------------------------------------------


def read_and_plan(field, using, pks):
    """The claimed rows' plans: ``(clear, confirm, encode, fail)`` lists of PlannedRow.

    Rows deleted since the claim are absent from all four.
    """
    source, vector_hash = field.source_hash_attname, field.vector_hash_attname
    manager = field.model._base_manager.db_manager(using)
    rows = field.load_for_text(manager.all(), source, vector_hash).in_bulk(pks)
    clear, confirm, encode, fail = [], [], [], []
    chunker = None
    for pk, obj in rows.items():
        row = PlannedRow(pk, getattr(obj, source))
        try:
            text = field.build_text(obj)
        except Exception as exc:  # a callable source of the user's
            row.error = f"building the text failed: {type(exc).__name__}: {exc}"
            fail.append(row)
            continue
        if not text:
            clear.append(row)
            continue
        row.text_hash = field.text_hash(text)
        if getattr(obj, vector_hash) == row.text_hash:
            confirm.append(row)
            continue
        if field.chunk_model is None:
            row.pieces = [Chunk(0, 0, len(text), text, 1)]
        else:
            if chunker is None:
                # Splitting needs the model's tokenizer: the model loads here.
                field.verify_encoder()
                chunker = Chunker(field.encoder, field.overlap)
            try:
                row.pieces = chunker.split(text)
            except ImproperlyConfigured:
                raise  # the model's, not the text's: every row would fail
            except Exception as exc:
                row.error = f"splitting the text failed: {type(exc).__name__}: {exc}"
            else:
                if len(row.pieces) > field.max_chunks:
                    row.error = (
                        f"the text splits into {len(row.pieces):,} chunks, more than max_chunks "
                        f"({field.max_chunks:,}); raise EmbeddingField(max_chunks=) or SEMANTIC['MAX_CHUNKS'], "
                        f"or shorten the text"
                    )
            if row.error:
                row.pieces = []
                fail.append(row)
                continue
        row.keys = [field.encoder.text_hash(piece.text) for piece in row.pieces]
        encode.append(row)
    return clear, confirm, encode, fail


# --- 4. encode -------------------------------------------------------------------


def encode_pieces(field, rows, deadline=None):
    """The vectors of the rows' pieces: ``(vectors by key, errors by key, out_of_time)``.

    Cached pieces are not encoded. The rest are encoded shortest first, in
    slices of a few forward passes; after each slice the new vectors go to
    the cache, and the deadline (``time.monotonic()`` value) is checked.
    The first slice always runs, so every round makes progress.
    """
    texts = {key: piece.text for row in rows for key, piece in zip(row.keys, row.pieces)}
    vectors = embedding_cache.get_vectors(sorted(texts))
    missing = sorted((key for key in texts if key not in vectors), key=lambda key: (len(texts[key]), key))
    errors = {}
    if not missing:
        return vectors, errors, False
    encoder = field.encoder
    field.verify_encoder()
    size = batch_size_for(str(encoder.model.device)) * PASSES_PER_SLICE
    for start in range(0, len(missing), size):
        if start and deadline is not None and time.monotonic() >= deadline:
            return vectors, errors, True
        keys = missing[start : start + size]
        encoded, failures = encoder.encode([texts[key] for key in keys])
        fresh = {key: vector for key, vector in zip(keys, encoded) if vector is not None}
        embedding_cache.set_vectors(fresh)
        vectors.update(fresh)
        errors.update({keys[index]: message for index, message in failures.items()})
    return vectors, errors, False


# --- 5. write --------------------------------------------------------------------


class RowWriter:
    """Guarded writes to one field's rows, in the caller's transaction.

    Each method takes rows that start with ``(pk, guard)`` and writes only
    those whose source hash still equals the guard; it returns the pks
    written.
    """

    def __init__(self, field, using):
        self.field = field
        self.connection = connections[using]
        meta = field.model._meta
        qn = self.connection.ops.quote_name
        self.qn = qn
        self.table = qn(meta.db_table)
        self.pk = qn(meta.pk.column)
        self.pk_type = meta.pk.db_type(self.connection)
        self.columns = {
            name: qn(meta.get_field(attname).column)
            for name, attname in (
                ("vector", field.attname),
                ("source", field.source_hash_attname),
                ("vector_hash", field.vector_hash_attname),
                ("failed_hash", field.failed_hash_attname),
                ("attempts", field.attempts_attname),
                ("error", field.error_attname),
            )
        }

    def _update(self, assignments, values, rows, condition="", returning=""):
        """``UPDATE … SET assignments FROM (VALUES rows) AS v(pk, guard, *values)`` where the guard holds."""
        if not rows:
            return []
        c = self.columns
        types = [self.pk_type, "text", *values.values()]
        placeholder = "(" + ", ".join(f"CAST(%s AS {kind})" for kind in types) + ")"
        names = ", ".join(["pk", "guard", *values])
        sets = ", ".join(f"{c[column]} = {expression}" for column, expression in assignments.items())
        sql = (
            f"UPDATE {self.table} AS t SET {sets}"
            f" FROM (VALUES {', '.join([placeholder] * len(rows))}) AS v({names})"
            f" WHERE t.{self.pk} = v.pk AND t.{c['source']} IS NOT DISTINCT FROM v.guard{condition}"
            f" RETURNING t.{self.pk}{returning}"
        )
        with self.connection.cursor() as cursor:
            cursor.execute(sql, [value for row in rows for value in row])
            return cursor.fetchall()

    # A row that leaves the pending state forgets any failure.
    _NO_FAILURE = {"failed_hash": "NULL", "attempts": "0", "error": "NULL"}

    def write_vectors(self, rows):
        """(pk, guard, text_hash, vector_literal): the vector of that text, and its hash as both hashes."""
        assignments = {"vector": "v.vec", "vector_hash": "v.new_hash", "source": "v.new_hash", **self._NO_FAILURE}
        return [pk for pk, in self._update(assignments, {"new_hash": "text", "vec": "vector"}, rows)]

    def confirm(self, rows):
        """(pk, guard, text_hash) of rows whose vector hash already is their text's hash."""
        c = self.columns
        assignments = {"source": "v.new_hash", **self._NO_FAILURE}
        condition = f" AND t.{c['vector_hash']} = v.new_hash"
        return [pk for pk, in self._update(assignments, {"new_hash": "text"}, rows, condition)]

    def clear(self, rows):
        """(pk, guard) of rows without text: no vector, no hashes."""
        assignments = {"vector": "NULL", "vector_hash": "NULL", "source": "NULL", **self._NO_FAILURE}
        return [pk for pk, in self._update(assignments, {}, rows)]

    def record_failures(self, rows):
        """(pk, guard, failed_hash, error): returns [(pk, attempts)] of the rows recorded.

        The attempts count on while the same source hash fails again.
        """
        c = self.columns
        assignments = {
            "source": "v.failed",
            "failed_hash": "v.failed",
            "error": "v.error",
            "attempts": f"CASE WHEN t.{c['failed_hash']} = v.failed THEN t.{c['attempts']} + 1 ELSE 1 END",
        }
        # RETURNING sees the new row: the attempts just written.
        return self._update(assignments, {"failed": "text", "error": "text"}, rows, returning=f", t.{c['attempts']}")

    def replace_chunks(self, pks, chunks):
        """Give the rows ``pks`` exactly the chunks in ``chunks`` ({pk: [(Chunk, key, vector)]}).

        Old chunks of those rows are deleted (all of them for a row missing
        from ``chunks``: its text became empty), the new ones inserted.
        """
        chunk_model = self.field.chunk_model
        if not pks or chunk_model is None:
            return
        meta = chunk_model._meta
        qn = self.qn
        chunk_table = qn(meta.db_table)
        owner = qn(meta.get_field("owner").column)
        with self.connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {chunk_table} WHERE {owner} = ANY(%s)", [list(pks)])
        columns = ", ".join(qn(meta.get_field(name).column) for name in ("owner", "index", "start", "end", "text", "text_hash", "embedding"))
        rows = [
            (pk, chunk.index, chunk.start, chunk.end, chunk.text, key, vector_literal(vector))
            for pk in pks
            for chunk, key, vector in chunks.get(pk, ())
        ]
        placeholder = "(%s, %s, %s, %s, %s, %s, CAST(%s AS vector))"
        with self.connection.cursor() as cursor:
            for start in range(0, len(rows), CHUNK_INSERT_BATCH):
                batch = rows[start : start + CHUNK_INSERT_BATCH]
                cursor.execute(
                    f"INSERT INTO {chunk_table} ({columns}) VALUES {', '.join([placeholder] * len(batch))}",
                    [value for row in batch for value in row],
                )


# --- the round -------------------------------------------------------------------


def embed_batch(field, using="default", claim_size=None, skip=(), deadline=None):
    """Claim, read, plan, encode and write one batch of ``field``'s pending rows; returns an EmbedResult.

    ``claim_size`` defaults to CLAIM_SIZE; ``skip`` lists pks not to claim;
    ``deadline`` (a ``time.monotonic()`` value) stops encoding between
    slices, leaving the rows not reached pending.
    """
    result = EmbedResult()
    with transaction.atomic(using=using):
        pks = claim(field, using, claim_size or semantic_settings.CLAIM_SIZE, skip)
        result.claimed = len(pks)
        if not pks:
            return result
        clear, confirm, encode, fail = read_and_plan(field, using, pks)
        vectors, errors, result.out_of_time = encode_pieces(field, encode, deadline)

        normalize = bool(field.encoder.config["normalize"])
        embedded, chunks = [], {}
        for row in encode:
            row_errors = [errors[key] for key in row.keys if key in errors]
            if row_errors:
                row.error = f"encoding a chunk failed: {row_errors[0]}"
                fail.append(row)
            elif all(key in vectors for key in row.keys):
                row_vectors = [vectors[key] for key in row.keys]
                vector = weighted_mean(row_vectors, [piece.tokens for piece in row.pieces], normalize)
                embedded.append((row.pk, row.guard, row.text_hash, vector_literal(vector)))
                chunks[row.pk] = list(zip(row.pieces, row.keys, row_vectors))
            else:
                result.deferred += 1

        writer = RowWriter(field, using)
        written = writer.write_vectors(embedded)
        writer.replace_chunks(written, chunks)
        confirmed = writer.confirm([(row.pk, row.guard, row.text_hash) for row in confirm])
        cleared = writer.clear([(row.pk, row.guard) for row in clear])
        writer.replace_chunks(cleared, {})
        # A failure is bound to the text's hash when it is known, so that
        # saving the same text again keeps the row failed.
        failures = [
            (row.pk, row.guard, row.text_hash or row.guard, row.error[:ERROR_LENGTH])
            for row in fail
            if (row.text_hash or row.guard) is not None
        ]
        recorded = writer.record_failures(failures)
    result.embedded, result.confirmed, result.cleared = len(written), len(confirmed), len(cleared)
    result.failed = [pk for pk, _ in recorded]
    sent = len(embedded) + len(confirm) + len(clear) + len(failures)
    result.superseded = sent - result.written - len(recorded)
    _log_failures(field, fail, dict(recorded))
    return result


def _log_failures(field, rows, attempts):
    label = f"{field.model._meta.label}.{field.name}"
    for row in rows:
        if row.pk not in attempts:
            continue
        if attempts[row.pk] >= max_attempts():
            logger.error(
                "semantic: %s row %r failed %d time(s) and is set aside (semantic_reindex --failed retries it): %s",
                label, row.pk, attempts[row.pk], row.error,
            )
        else:
            logger.warning("semantic: %s row %r could not be embedded (attempt %d): %s", label, row.pk, attempts[row.pk], row.error)


def embed_stale_rows(field, using="default", *, time_budget=None, claim_size=None, skip=()):
    """Embed pending rows of ``field`` until none can be claimed or the time budget runs out.

    ``time_budget`` (seconds, default TASK_TIME_BUDGET) is checked inside
    each batch too. Rows that fail, and those in ``skip``, are not claimed
    again by the same call, so one bad row cannot spin a worker: its next
    attempt is another task's. Returns the summed EmbedResult.
    """
    budget = semantic_settings.TASK_TIME_BUDGET if time_budget is None else time_budget
    deadline = time.monotonic() + budget
    skip = set(skip)
    totals = EmbedResult()
    while True:
        result = embed_batch(field, using, claim_size, skip=skip, deadline=deadline)
        totals.add(result)
        skip.update(result.failed)
        if not result.claimed or result.out_of_time:
            return totals
        if time.monotonic() >= deadline:
            totals.out_of_time = True
            return totals
