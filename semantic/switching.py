"""
Switching a field to another encoder configuration without a hole in search.

Pointing a field's alias at a new model makes every row stale at once, and
searches leave stale vectors of another configuration out: until the worker
has re-embedded the table, search covers a shrinking, then growing, subset.
A switch instead fills the new configuration's vectors beside the live ones
(semantic.slots) and changes which slot answers searches in one statement:

1. ``prepare(field, alias)`` (``semantic_prepare``) adds the next slot's
   columns and chunk table, their HNSW indexes (built on empty columns, so
   the worker fills an index that is ready at promotion), and the switch's
   row (semantic.models.Switch). Workers fill the next slot with the same
   claim/guard pipeline as the declared one (semantic.worker), while
   searches keep the declared slot and its query encoder.
2. ``promote(field)`` (``semantic_promote``) sets the row's ``live``, once the
   next slot has no row pending (or ``force``): every search built after the
   commit uses the next slot and its encoder. ``rollback(field)`` clears it.
   Both slots stay filled for as long as the switch exists, so either
   direction is one statement, and a row edited meanwhile ends fresh in both.
3. ``cancel(field)`` (``semantic_prepare --cancel``), before promotion, drops
   the next slot and the row. ``finish(field)`` (``semantic_promote
   --finish``), once the field's code declares the promoted model and its
   own columns are refilled with it (from the cache), makes them answer
   again and drops the next slot.

Which slot a search uses is read when the search is built (``live_slot``),
from the database the search runs on: with every search for a field that
has a switch (one primary-key read), and every SWITCH_POLL_SECONDS otherwise
(a process learns of a new switch within that time; ``promote`` waits at
least that long after ``prepare``). A search built before a promotion and
evaluated after it still compares its own slot's vectors with its own
slot's query vector: a switch never mixes the two.
"""

import contextlib
import contextvars
import time

from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.utils import timezone

from semantic.conf import semantic_settings
from semantic.distances import MAX_DIMENSIONS
from semantic.encoders import get_encoder
from semantic.fields import field_label
from semantic.slots import NextSlot, Slot

SWITCH_TABLE = "semantic_switch"
# A row of the declared slot's HNSW index build parameters, where the field has none.
HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}


class SwitchError(Exception):
    """A switch cannot go on as asked (no switch, already promoted, rows still pending, ...)."""


# --- which slot a search uses ------------------------------------------------------------

# (using, field label) -> (row tuple (alias, dimensions, live) or None, monotonic time read).
_switches = {}
# using -> (whether semantic_switch exists, monotonic time checked)
_tables = {}


def forget_switches():
    """Drop what this process knows of switches (tests; ``prepare`` and friends call it themselves)."""
    _switches.clear()
    _tables.clear()


def _table_exists(using, now):
    known = _tables.get(using)
    if known is not None and now - known[1] < semantic_settings.SWITCH_POLL_SECONDS:
        return known[0]
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [SWITCH_TABLE])
        exists = cursor.fetchone()[0]
    _tables[using] = (exists, now)
    return exists


def switch_state(field, using="default"):
    """``(alias, dimensions, live)`` of the field's switch in database ``using``, or None.

    Read from the database with every call while the field has a switch;
    "no switch" is remembered for SWITCH_POLL_SECONDS. A database without
    the app's table (not migrated yet) has no switches.
    """
    key = (using, field_label(field))
    now = time.monotonic()
    known = _switches.get(key)
    if known is not None and known[0] is None and now - known[1] < semantic_settings.SWITCH_POLL_SECONDS:
        return None
    if connections[using].vendor != "postgresql" or not _table_exists(using, now):
        row = None
    else:
        with connections[using].cursor() as cursor:
            cursor.execute(f"SELECT alias, dimensions, live FROM {SWITCH_TABLE} WHERE field = %s", [key[1]])
            row = cursor.fetchone()
    _switches[key] = (row, now)
    return row


def switch_slots(field, using="default"):
    """``(next slot or None, the slot that answers searches)`` of ``field``, from one read of its switch.

    The slot answering is the next one once promoted, else the declared
    one (whatever ``searching`` chooses: see ``live_slot``).
    """
    state = switch_state(field, using)
    if state is None:
        return None, Slot(field)
    upcoming = NextSlot(field, state[0], state[1])
    return upcoming, upcoming if state[2] else Slot(field)


def next_slot(field, using="default"):
    """The field's next slot in ``using``, or None when it has no switch."""
    return switch_slots(field, using)[0]


_chosen = contextvars.ContextVar("semantic_chosen_slots", default=None)


@contextlib.contextmanager
def searching(slot):
    """Within the block, searches of ``slot.field`` built in this context use ``slot``, whichever is live.

    What ``semantic_evaluate --compare-next`` runs each slot's searches under.
    """
    chosen = dict(_chosen.get() or {})
    chosen[(slot.field.model, slot.field.name)] = slot
    token = _chosen.set(chosen)
    try:
        yield slot
    finally:
        _chosen.reset(token)


def live_slot(field, using="default"):
    """The slot searches of ``field`` use now: the next one once promoted, else the declared one."""
    chosen = _chosen.get()
    if chosen and (field.model, field.name) in chosen:
        return chosen[(field.model, field.name)]
    return switch_slots(field, using)[1]


def filling_slots(field, using="default"):
    """The slots a worker keeps fresh for ``field``: the live one first, then the other if there is a switch."""
    upcoming, live = switch_slots(field, using)
    if upcoming is None:
        return [live]
    return [live, Slot(field) if live.is_next else upcoming]


# --- the steps -------------------------------------------------------------------------------


def _switch_model():
    from semantic.models import Switch

    return Switch


def next_dimensions(alias):
    """The vector size of alias ``alias``: declared in its settings, else read from the loaded model."""
    config = semantic_settings.model_config(alias)
    if config["dimensions"] is not None:
        return int(config["dimensions"])
    return int(get_encoder(alias).model.get_embedding_dimension())


def prepare(field, alias, using="default"):
    """Start switching ``field`` to model alias ``alias``; returns the NextSlot.

    Adds the next slot's columns, chunk table and indexes (semantic.slots)
    and the switch's row, then the worker fills the slot. Must run outside a
    transaction (the owner table's index is built CONCURRENTLY, so writes to
    the table go on meanwhile). Raises SwitchError when the field already
    has a switch or the alias is its declared one, ImproperlyConfigured for
    an unknown alias or vectors the storage cannot index. Safe to run again
    after an interruption: every statement skips what exists.
    """
    connection = connections[using]
    if connection.in_atomic_block:
        raise SwitchError("prepare builds an index CONCURRENTLY: run it outside a transaction.")
    label = field_label(field)
    switch_model = _switch_model()
    existing = switch_model.objects.using(using).filter(field=label).first()
    if existing is not None and existing.alias != alias:
        raise SwitchError(
            f"{label} is already being switched to {existing.alias!r}: promote it, or cancel it "
            f"(semantic_prepare {label} --cancel) before preparing another."
        )
    dimensions = next_dimensions(alias)
    slot = NextSlot(field, alias, dimensions)
    if slot.fingerprint == Slot(field).fingerprint:
        raise SwitchError(f"{label} already holds alias {alias!r}'s vectors (same fingerprint): there is nothing to switch to.")
    storage = field.storage_type
    if dimensions > min(MAX_DIMENSIONS, storage.index_dimensions):
        raise ImproperlyConfigured(
            f"Alias {alias!r} makes {dimensions:,}-dimensional vectors; pgvector indexes {storage.name} "
            f"columns of at most {storage.index_dimensions:,}, and a switch needs the index before promotion."
        )
    if slot.chunked:
        from semantic.chunking import Chunker

        # The next model's windows must fit the field's overlap; the
        # tokenizer says (and the model is loaded once, before any DDL).
        Chunker(slot.encoder, field.overlap)
    _create_slot(slot, connection)
    if existing is None:
        switch_model.objects.using(using).create(field=label, alias=alias, dimensions=dimensions)
    forget_switches()
    from semantic.wakeups import enqueue_embedding

    enqueue_embedding(field.model, field.name, using, force=True)
    return slot


def _owner_index_options(field):
    """The HNSW build parameters of the field's own index (pgvector's defaults when it has none)."""
    for index in field.model._meta.indexes:
        if field.name in getattr(index, "fields", ()) and type(index).__name__ == "HnswIndex":
            return {name: getattr(index, name, None) or HNSW_DEFAULTS[name] for name in HNSW_DEFAULTS}
    return dict(HNSW_DEFAULTS)


def _create_slot(slot, connection):
    field = slot.field
    meta = field.model._meta
    qn = connection.ops.quote_name
    table = qn(meta.db_table)
    column = {part: qn(slot.column_name(part)) for part in ("vector", "vector_hash", "guard", "error")}
    too_long = [name for name in column.values() if len(name) - 2 > connection.ops.max_name_length()]
    if too_long:
        raise ImproperlyConfigured(f"{slot.label}: the next slot's column {too_long[0]} is longer than PostgreSQL's names.")
    hash_type = meta.get_field(field.source_hash_attname).db_type(connection)
    index_name = _index_name(slot, "hnsw")
    options = _owner_index_options(field)
    with transaction.atomic(using=connection.alias):
        with connection.cursor() as cursor:
            cursor.execute(
                f"ALTER TABLE {table}"
                f" ADD COLUMN IF NOT EXISTS {column['vector']} {slot.vector_type},"
                f" ADD COLUMN IF NOT EXISTS {column['vector_hash']} {hash_type},"
                f" ADD COLUMN IF NOT EXISTS {column['guard']} {hash_type},"
                f" ADD COLUMN IF NOT EXISTS {column['error']} text"
            )
            if slot.chunked:
                declared = qn(field.chunk_model._meta.db_table)
                chunks = qn(slot.chunk_table)
                owner_column = qn(field.chunk_model._meta.get_field("owner").column)
                embedding = qn(field.chunk_model._meta.get_field("embedding").column)
                # Indexes, defaults, identity and storage as the declared
                # table's (its HNSW index with the field's chunk_index),
                # the vectors of the next size; LIKE copies no foreign key.
                cursor.execute(f"CREATE TABLE IF NOT EXISTS {chunks} (LIKE {declared} INCLUDING ALL)")
                cursor.execute(f"ALTER TABLE {chunks} ALTER COLUMN {embedding} TYPE {slot.vector_type}")
                # A new type brings its own storage (pgvector's EXTERNAL, which
                # sends each chunk's vector to TOAST): keep the declared table's
                # (MAIN, semantic.chunking.InlineStorage). Measured on the demo:
                # an exact chunk scan read 17,000 buffers instead of 2,200.
                cursor.execute(
                    "SELECT attstorage FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s",
                    [declared, field.chunk_model._meta.get_field("embedding").column],
                )
                storage = {"p": "PLAIN", "m": "MAIN", "e": "EXTERNAL", "x": "EXTENDED"}[cursor.fetchone()[0]]
                cursor.execute(f"ALTER TABLE {chunks} ALTER COLUMN {embedding} SET STORAGE {storage}")
                fk = qn(_index_name(slot, "owner_fk"))
                cursor.execute(
                    "SELECT 1 FROM pg_constraint WHERE conname = %s AND conrelid = to_regclass(%s)", [_index_name(slot, "owner_fk"), chunks]
                )
                if cursor.fetchone() is None:
                    cursor.execute(
                        f"ALTER TABLE {chunks} ADD CONSTRAINT {fk} FOREIGN KEY ({owner_column})"
                        f" REFERENCES {table} ({qn(meta.pk.column)}) ON DELETE CASCADE"
                    )
    with connection.cursor() as cursor:
        # Outside the transaction: CONCURRENTLY lets writes go on. On a column
        # of NULLs it is quick; the worker's writes then fill it.
        cursor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {qn(index_name)} ON {table} USING hnsw"
            f" ({column['vector']} {field.opclass_for(field.storage)})"
            f" WITH (m = {int(options['m'])}, ef_construction = {int(options['ef_construction'])})"
        )


def _index_name(slot, suffix):
    from django.db.backends.utils import names_digest

    return f"semantic_next_{names_digest(slot.field.model._meta.db_table, slot.field.column, length=8)}_{suffix}"


def index_is_ready(slot, using="default"):
    """Whether the next slot's HNSW index on the owner table exists and is valid (a CONCURRENTLY build that failed is not)."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [_index_name(slot, "hnsw")])
        found = cursor.fetchone()
    return bool(found and found[0])


def _locked_switch(field, using):
    switch = _switch_model().objects.using(using).select_for_update().filter(field=field_label(field)).first()
    if switch is None:
        raise SwitchError(f"{field_label(field)} has no switch: prepare one first (semantic_prepare {field_label(field)} --model ALIAS).")
    return switch


def promote(field, using="default", *, force=False):
    """Make the next slot answer every search of ``field`` from the commit on; returns its status counts.

    Refuses (SwitchError) while rows of the next slot are pending (stale,
    missing, other model), unless ``force``: a forced promotion searches
    the rows the next slot covers, as a search during any re-embedding
    does. Waits, if needed, until SWITCH_POLL_SECONDS have passed since
    ``prepare``, so that every process knows of the switch.
    """
    slot = next_slot(field, using)
    if slot is None:
        raise SwitchError(f"{field_label(field)} has no switch: prepare one first (semantic_prepare {field_label(field)} --model ALIAS).")
    if not index_is_ready(slot, using):
        raise SwitchError(f"{slot.label}: the next slot's HNSW index is missing or invalid; run semantic_prepare again to build it.")
    with transaction.atomic(using=using):
        switch = _locked_switch(field, using)
        if switch.live:
            raise SwitchError(f"{slot.label} is already promoted.")
        counts = slot.count_statuses(using)
        if counts["pending"] and not force:
            raise SwitchError(
                f"{slot.label}: {counts['pending']:,} of {counts['with_text']:,} rows with text are still pending in the "
                f"next slot (semantic_status shows the fill); promote when none is, or with --force."
            )
        wait = semantic_settings.SWITCH_POLL_SECONDS - (timezone.now() - switch.prepared_at).total_seconds()
        if wait > 0:
            time.sleep(wait)
        switch.live = True
        switch.promoted_at = timezone.now()
        switch.save(update_fields=["live", "promoted_at"])
    forget_switches()
    return counts


def rollback(field, using="default"):
    """Make the declared slot answer every search of ``field`` again; the next slot stays, filled."""
    with transaction.atomic(using=using):
        switch = _locked_switch(field, using)
        if not switch.live:
            raise SwitchError(f"{field_label(field)}'s switch is not promoted: there is nothing to roll back.")
        switch.live = False
        switch.save(update_fields=["live"])
    forget_switches()


def cancel(field, using="default"):
    """Drop ``field``'s next slot (columns, chunk table, index) and its switch; refused once promoted."""
    slot = next_slot(field, using)
    with transaction.atomic(using=using):
        switch = _locked_switch(field, using)
        if switch.live:
            raise SwitchError(f"{field_label(field)}'s switch is promoted: roll it back (semantic_promote --rollback) before cancelling.")
        switch.delete()
        _drop_slot(slot, connections[using])
    forget_switches()


def finish(field, using="default"):
    """End a promoted switch once the field itself declares the promoted model; returns the declared slot's counts.

    After the promotion, point the field at the next alias in code
    (``model=``; with a migration when the dimensions change, which may
    clear the column: searches do not read it meanwhile). The declared
    slot's vectors are then of another model, and the workers re-embed
    them, from the embedding cache that the next slot's fill filled (no
    model runs but the tokenizer). Once the declared slot has the next
    slot's fingerprint and no row pending, ``finish`` makes it answer the
    searches again and drops the next slot, in one transaction: the same
    model before and after, so the results do not change. SwitchError
    otherwise.
    """
    slot = next_slot(field, using)
    declared = Slot(field)
    with transaction.atomic(using=using):
        switch = _locked_switch(field, using)
        label = field_label(field)
        if not switch.live:
            raise SwitchError(f"{label}'s switch is not promoted: promote it, or cancel it (semantic_prepare --cancel).")
        if declared.fingerprint != slot.fingerprint:
            raise SwitchError(
                f"{label} still declares {field.model_alias!r}: point the field at {slot.alias!r} "
                f"(EmbeddingField(model={slot.alias!r})) first, so that its own columns are refilled with the promoted model."
            )
        counts = declared.count_statuses(using)
        if counts["pending"]:
            raise SwitchError(
                f"{label}: {counts['pending']:,} rows of the declared slot are still pending (being re-embedded with "
                f"{slot.alias!r}, from the cache); finish when none is."
            )
        switch.delete()
        _drop_slot(slot, connections[using])
    forget_switches()
    return counts


def _drop_slot(slot, connection):
    qn = connection.ops.quote_name
    columns = ", ".join(f"DROP COLUMN IF EXISTS {qn(slot.column_name(part))}" for part in ("vector", "vector_hash", "guard", "error"))
    with connection.cursor() as cursor:
        # Dropping the column drops its index.
        cursor.execute(f"ALTER TABLE {qn(slot.field.model._meta.db_table)} {columns}")
        if slot.chunked:
            cursor.execute(f"DROP TABLE IF EXISTS {qn(slot.chunk_table)}")
