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
   vectors travel in binary (a COPY into a temporary table the UPDATE
   joins). The rows given a vector get their chunks brought in line in the
   same transaction, writing only what differs: a stored chunk with the
   same index and text hash is kept. A row whose text fails is recorded
   (``<field>_failed_hash``, ``_attempts``, ``_error``) and set aside after
   MAX_ATTEMPTS (semantic.status).

Every step works on a *slot* (semantic.slots): the field's declared columns,
or, while the field is switched to another model, its next slot, which the
same pipeline fills with the next encoder. A function given a field works on
its declared slot.
"""

import logging
import time
import zlib
from dataclasses import dataclass, field as dataclass_field

from django.db import connections, transaction

from semantic import cache as embedding_cache
from semantic.chunking import Chunk, Chunker, weighted_mean
from semantic.conf import semantic_settings
from semantic.distances import vector_literal
from semantic.encoders import batch_size_for
from semantic.slots import Slot
from semantic.status import max_attempts

logger = logging.getLogger("semantic")

# Chunk rows per INSERT statement.
CHUNK_INSERT_BATCH = 500
# The session's temporary table that carries a write's vectors (see RowWriter._stage).
STAGE_TABLE = "semantic_worker_vectors"
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


def as_slot(target):
    """``target`` if it is a slot, else the declared slot of ``target`` (an EmbeddingField)."""
    return target if isinstance(target, Slot) else Slot(target)


def lock_namespace(slot):
    """A stable int4 per (table, slot's vector column): the first key of the claim's advisory locks."""
    value = zlib.crc32(as_slot(slot).lock_key.encode())
    return value - 2**32 if value >= 2**31 else value


# --- 1. claim ------------------------------------------------------------------


def claim(slot, using, limit, skip=()):
    """Lock up to ``limit`` pending rows of ``slot`` (or a field's declared slot) for this transaction; returns their pks.

    Rows whose pk is in ``skip`` (failed earlier in the same task) are
    passed over. The rows are those of the slot's ``pending_q``; raw SQL
    only adds the locks, which the ORM cannot express.
    """
    slot = as_slot(slot)
    pending = slot.field.model._base_manager.db_manager(using).filter(slot.pending_q()).order_by()
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
        cursor.execute(claim_sql, [*params, lock_namespace(slot), limit])
        return [row[0] for row in cursor.fetchall()]


# --- 2. read and 3. plan ---------------------------------------------------------


# What read_and_plan annotates each row with: the slot's vector hash.
SLOT_VECTOR_HASH = "_semantic_slot_vector_hash"


def read_and_plan(slot, using, pks):
    """The claimed rows' plans: ``(clear, confirm, encode, fail)`` lists of PlannedRow.

    Rows deleted since the claim are absent from all four. Only the texts
    of rows to encode are split (a row whose vector hash in the slot already
    is its text's hash is confirmed without tokenizing), in few tokenizer
    calls.
    """
    slot = as_slot(slot)
    field = slot.field
    source = field.source_hash_attname
    manager = field.model._base_manager.db_manager(using)
    rows = field.load_for_text(manager.all(), source).annotate(**{SLOT_VECTOR_HASH: slot.vector_hash()}).in_bulk(pks)
    clear, confirm, encode, fail = [], [], [], []
    texts = []  # of the rows in ``encode``, in order
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
        row.text_hash = slot.text_hash(text)
        if getattr(obj, SLOT_VECTOR_HASH) == row.text_hash:
            confirm.append(row)
            continue
        encode.append(row)
        texts.append(text)
    if not slot.chunked:
        pieces = [[Chunk(0, 0, len(text), text, 1)] for text in texts]
    elif texts:
        # Splitting needs the model's tokenizer: the model loads here.
        slot.verify_encoder()
        # ImproperlyConfigured (the model's, not a text's: every row would fail) propagates.
        pieces = Chunker(slot.encoder, field.overlap).split_many(texts)
    else:
        pieces = []
    planned = []
    for row, split in zip(encode, pieces):
        if isinstance(split, Exception):
            row.error = f"splitting the text failed: {type(split).__name__}: {split}"
        elif len(split) > field.max_chunks:
            row.error = (
                f"the text splits into {len(split):,} chunks, more than max_chunks "
                f"({field.max_chunks:,}); raise EmbeddingField(max_chunks=) or SEMANTIC['MAX_CHUNKS'], "
                f"or shorten the text"
            )
        if row.error:
            fail.append(row)
            continue
        row.pieces = split
        row.keys = [slot.encoder.text_hash(piece.text) for piece in split]
        planned.append(row)
    return clear, confirm, planned, fail


# --- 4. encode -------------------------------------------------------------------


def encode_pieces(slot, rows, deadline=None):
    """The vectors of the rows' pieces: ``(vectors by key, errors by key, out_of_time)``.

    Cached pieces are not encoded. The rest are encoded shortest first, in
    slices of a few forward passes; after each slice the new vectors go to
    the cache, and the deadline (``time.monotonic()`` value) is checked.
    The first slice always runs, so every round makes progress.
    """
    slot = as_slot(slot)
    texts = {key: piece.text for row in rows for key, piece in zip(row.keys, row.pieces)}
    vectors = embedding_cache.get_vectors(sorted(texts), dimensions=slot.dimensions)
    missing = sorted((key for key in texts if key not in vectors), key=lambda key: (len(texts[key]), key))
    errors = {}
    if not missing:
        return vectors, errors, False
    encoder = slot.encoder
    slot.verify_encoder()
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
    """Guarded writes to one slot's rows, in the caller's transaction.

    Each method takes rows that start with ``(pk, guard)`` and writes only
    those whose source hash still equals the guard; it returns the pks
    written. Vectors travel to PostgreSQL in binary (see ``_stage``): no
    float is formatted as text, and none parsed back.

    The declared slot owns the source hash: a write sets it to the text's
    hash. A next slot never writes it: it records the source hash it read
    (the guard) in its own guard column (semantic.slots).
    """

    def __init__(self, slot, using):
        self.slot = slot = as_slot(slot)
        field = slot.field
        self.field = field
        self.connection = connections[using]
        meta = field.model._meta
        qn = self.connection.ops.quote_name
        self.qn = qn
        self.table = qn(meta.db_table)
        self.pk = qn(meta.pk.column)
        self.pk_type = meta.pk.db_type(self.connection)
        self.vector_type = slot.vector_type
        if slot.is_next:
            parts = ("vector", "vector_hash", "guard", "error")
            self.columns = {part: qn(slot.column_name(part)) for part in parts}
            self.columns["source"] = qn(meta.get_field(field.source_hash_attname).column)
        else:
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

    def _settled(self, new_hash):
        """What a write that leaves the pending state sets besides the vector: the text's hash as the slot's record of it, no failure."""
        if self.slot.is_next:
            return {"guard": "v.guard", "error": "NULL"}
        return {"source": new_hash, **self._NO_FAILURE}

    def _update(self, assignments, values, rows, condition="", returning="", join=""):
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
            f" FROM (VALUES {', '.join([placeholder] * len(rows))}) AS v({names}){join}"
            f" WHERE t.{self.pk} = v.pk AND t.{c['source']} IS NOT DISTINCT FROM v.guard{condition}"
            f" RETURNING t.{self.pk}{returning}"
        )
        with self.connection.cursor() as cursor:
            cursor.execute(sql, [value for row in rows for value in row])
            return cursor.fetchall()

    def _stage(self, vectors):
        """Load ``vectors`` into this session's temporary table, numbered from 0; returns the join to use.

        The table (``n``, ``vec``) is emptied first and at every commit. A
        binary COPY carries the vectors (psycopg 3); without one, a
        multi-row INSERT of text literals does the same, slower.
        """
        with self.connection.cursor() as cursor:
            cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_TABLE} (n integer, vec vector) ON COMMIT DELETE ROWS")
            cursor.execute(f"DELETE FROM {STAGE_TABLE}")
            if hasattr(cursor.cursor, "copy"):
                with self.connection.wrap_database_errors:
                    with cursor.cursor.copy(f"COPY {STAGE_TABLE} (n, vec) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(binary_copy_of_vectors(vectors))
            else:
                for start in range(0, len(vectors), CHUNK_INSERT_BATCH):
                    batch = vectors[start : start + CHUNK_INSERT_BATCH]
                    cursor.execute(
                        f"INSERT INTO {STAGE_TABLE} (n, vec) VALUES {', '.join(['(%s, CAST(%s AS vector))'] * len(batch))}",
                        [value for n, vector in enumerate(batch, start) for value in (n, vector_literal(vector))],
                    )
        return f" JOIN {STAGE_TABLE} AS s ON s.n = v.n"

    # A row that leaves the pending state forgets any failure.
    _NO_FAILURE = {"failed_hash": "NULL", "attempts": "0", "error": "NULL"}

    def write_vectors(self, rows):
        """(pk, guard, text_hash, vector): the vector of that text, and its hash as both hashes."""
        if not rows:
            return []
        join = self._stage([vector for *_, vector in rows])
        numbered = [(pk, guard, text_hash, n) for n, (pk, guard, text_hash, _) in enumerate(rows)]
        assignments = {
            "vector": f"CAST(s.vec AS {self.vector_type})",
            "vector_hash": "v.new_hash",
            **self._settled("v.new_hash"),
        }
        return [pk for pk, in self._update(assignments, {"new_hash": "text", "n": "integer"}, numbered, join=join)]

    def confirm(self, rows):
        """(pk, guard, text_hash) of rows whose vector hash already is their text's hash."""
        c = self.columns
        assignments = self._settled("v.new_hash")
        condition = f" AND t.{c['vector_hash']} = v.new_hash"
        return [pk for pk, in self._update(assignments, {"new_hash": "text"}, rows, condition)]

    def clear(self, rows):
        """(pk, guard) of rows without text: no vector, no hashes."""
        assignments = {"vector": "NULL", "vector_hash": "NULL", **self._settled("NULL")}
        return [pk for pk, in self._update(assignments, {}, rows)]

    def record_failures(self, rows):
        """(pk, guard, failed_hash, error): returns [(pk, attempts)] of the rows recorded.

        The attempts count on while the same source hash fails again. A next
        slot makes one attempt per text: its row is set aside at once, its
        vector (of an older text) removed.
        """
        c = self.columns
        if self.slot.is_next:
            assignments = {"vector": "NULL", "vector_hash": "NULL", "guard": "v.guard", "error": "v.error"}
            written = self._update(assignments, {"failed": "text", "error": "text"}, rows)
            return [(pk, max_attempts()) for pk, in written]
        assignments = {
            "source": "v.failed",
            "failed_hash": "v.failed",
            "error": "v.error",
            "attempts": f"CASE WHEN t.{c['failed_hash']} = v.failed THEN t.{c['attempts']} + 1 ELSE 1 END",
        }
        # RETURNING sees the new row: the attempts just written.
        return self._update(assignments, {"failed": "text", "error": "text"}, rows, returning=f", t.{c['attempts']}")

    def sync_chunks(self, pks, chunks):
        """Give the rows ``pks`` exactly the chunks in ``chunks`` ({pk: [(Chunk, key, vector)]}).

        Only what differs is written: a stored chunk with the same index and
        text hash (the same text under the same encoder, so the same vector)
        is kept, its offsets corrected if the text around it moved; the
        other stored chunks of those rows are deleted (all of them for a row
        missing from ``chunks``: its text became empty) and the new ones
        inserted. Returns ``(kept, deleted, inserted)`` counts.
        """
        chunk_model = self.slot.chunk_model
        if not pks or chunk_model is None:
            return 0, 0, 0
        # The slot's table has the chunk model's columns (semantic.slots).
        meta = chunk_model._meta
        qn = self.qn
        chunk_table = qn(self.slot.chunk_table)
        column = {name: qn(meta.get_field(name).column) for name in ("owner", "index", "start", "end", "text", "text_hash", "embedding")}
        chunk_pk = qn(meta.pk.column)
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {chunk_pk}, {column['owner']}, {column['index']}, {column['start']}, {column['end']}, {column['text_hash']}"
                f" FROM {chunk_table} WHERE {column['owner']} = ANY(%s)",
                [list(pks)],
            )
            stored = cursor.fetchall()
        wanted = {(pk, chunk.index): (chunk, key, vector) for pk in pks for chunk, key, vector in chunks.get(pk, ())}
        deleted, moved = [], []
        for chunk_id, owner, index, start, end, text_hash in stored:
            new = wanted.get((owner, index))
            if new is None or new[1] != text_hash:
                deleted.append(chunk_id)
                continue
            del wanted[(owner, index)]
            if (start, end) != (new[0].start, new[0].end):
                moved.append((chunk_id, new[0].start, new[0].end))
        with self.connection.cursor() as cursor:
            if deleted:
                # Before the inserts: (owner, index) is unique.
                cursor.execute(f"DELETE FROM {chunk_table} WHERE {chunk_pk} = ANY(%s)", [deleted])
            if moved:
                id_type = meta.pk.db_type(self.connection)
                placeholder = f"(CAST(%s AS {id_type}), CAST(%s AS integer), CAST(%s AS integer))"
                cursor.execute(
                    f"UPDATE {chunk_table} AS c SET {column['start']} = v.start_at, {column['end']} = v.end_at"
                    f" FROM (VALUES {', '.join([placeholder] * len(moved))}) AS v(id, start_at, end_at)"
                    f" WHERE c.{chunk_pk} = v.id",
                    [value for row in moved for value in row],
                )
        inserts = list(wanted.items())
        if inserts:
            join = self._stage([vector for _, (_, _, vector) in inserts])
            vector_type = self.slot.vector_type
            names = ", ".join(column[name] for name in ("owner", "index", "start", "end", "text", "text_hash", "embedding"))
            types = [self.pk_type, "integer", "integer", "integer", "text", "text", "integer"]
            placeholder = "(" + ", ".join(f"CAST(%s AS {kind})" for kind in types) + ")"
            rows = [
                (pk, chunk.index, chunk.start, chunk.end, chunk.text, key, n)
                for n, ((pk, _), (chunk, key, _)) in enumerate(inserts)
            ]
            with self.connection.cursor() as cursor:
                for start in range(0, len(rows), CHUNK_INSERT_BATCH):
                    batch = rows[start : start + CHUNK_INSERT_BATCH]
                    cursor.execute(
                        f"INSERT INTO {chunk_table} ({names})"
                        f" SELECT v.owner, v.idx, v.start_at, v.end_at, v.text, v.text_hash, CAST(s.vec AS {vector_type})"
                        f" FROM (VALUES {', '.join([placeholder] * len(batch))}) AS v(owner, idx, start_at, end_at, text, text_hash, n){join}",
                        [value for row in batch for value in row],
                    )
        return len(stored) - len(deleted), len(deleted), len(inserts)


def binary_copy_of_vectors(vectors):
    """PostgreSQL's binary COPY format of the rows ``(n, vector)``, n counting from 0.

    pgvector's binary form of a vector is its dimension and a zero (int16
    each) then its float32 values, all big-endian (vector_recv).
    """
    import numpy as np

    values = np.asarray(vectors, dtype=">f4")
    count, dimensions = values.shape
    layout = np.dtype(
        [("fields", ">i2"), ("n_size", ">i4"), ("n", ">i4"), ("vec_size", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dimensions,))]
    )
    rows = np.zeros(count, dtype=layout)
    rows["fields"], rows["n_size"], rows["n"] = 2, 4, np.arange(count)
    rows["vec_size"], rows["dim"], rows["vec"] = 4 + 4 * dimensions, dimensions, values
    # Signature, flags, header extension length; the rows; the trailer.
    return b"PGCOPY\n\xff\r\n\x00" + bytes(8) + rows.tobytes() + b"\xff\xff"


# --- the round -------------------------------------------------------------------


def embed_batch(slot, using="default", claim_size=None, skip=(), deadline=None):
    """Claim, read, plan, encode and write one batch of ``slot``'s pending rows (a field's: its declared slot's); returns an EmbedResult.

    ``claim_size`` defaults to CLAIM_SIZE; ``skip`` lists pks not to claim;
    ``deadline`` (a ``time.monotonic()`` value) stops encoding between
    slices, leaving the rows not reached pending.
    """
    slot = as_slot(slot)
    result = EmbedResult()
    with transaction.atomic(using=using):
        pks = claim(slot, using, claim_size or semantic_settings.CLAIM_SIZE, skip)
        result.claimed = len(pks)
        if not pks:
            return result
        clear, confirm, encode, fail = read_and_plan(slot, using, pks)
        vectors, errors, result.out_of_time = encode_pieces(slot, encode, deadline)

        normalize = bool(slot.encoder.config["normalize"])
        embedded, chunks = [], {}
        for row in encode:
            row_errors = [errors[key] for key in row.keys if key in errors]
            if row_errors:
                row.error = f"encoding a chunk failed: {row_errors[0]}"
                fail.append(row)
            elif all(key in vectors for key in row.keys):
                row_vectors = [vectors[key] for key in row.keys]
                vector = weighted_mean(row_vectors, [piece.tokens for piece in row.pieces], normalize)
                embedded.append((row.pk, row.guard, row.text_hash, vector))
                chunks[row.pk] = list(zip(row.pieces, row.keys, row_vectors))
            else:
                result.deferred += 1

        writer = RowWriter(slot, using)
        written = writer.write_vectors(embedded)
        writer.sync_chunks(written, chunks)
        confirmed = writer.confirm([(row.pk, row.guard, row.text_hash) for row in confirm])
        cleared = writer.clear([(row.pk, row.guard) for row in clear])
        writer.sync_chunks(cleared, {})
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
    _log_failures(slot, fail, dict(recorded))
    return result


def _log_failures(slot, rows, attempts):
    label = slot.label
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


def embed_stale_rows(slot, using="default", *, time_budget=None, claim_size=None, skip=()):
    """Embed pending rows of ``slot`` (a field's: its declared slot's) until none can be claimed or the time budget runs out.

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
        result = embed_batch(slot, using, claim_size, skip=skip, deadline=deadline)
        totals.add(result)
        skip.update(result.failed)
        if not result.claimed or result.out_of_time:
            return totals
        if time.monotonic() >= deadline:
            totals.out_of_time = True
            return totals
