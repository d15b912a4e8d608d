"""
Slots: where one encoder configuration's vectors of one EmbeddingField live.

Every field has its *declared* slot: the field's own columns (the vector,
``<field>_vector_hash``) and its chunk model, filled with the encoder its
``model=`` alias names. While the field is switched to another configuration
(semantic.switching), a *next* slot lives beside it:

* columns of the owner's table, added by ``semantic_prepare`` (their
  dimensions are the next model's, so they cannot be a migration of the
  field): ``<column>__next``, the vector, with an HNSW index of its own;
  ``<column>__next_hash``, the hash of the text it was made from under the
  next fingerprint; ``<column>__next_guard``, the row's source hash when that
  text was read; ``<column>__next_error``, why the text could not be encoded;
* for a chunked field, a chunk table shaped like the field's, its vectors of
  the next dimensions (``NextSlot.chunk_table``).

Both slots read one record of what the row's text is now: its source hash,
which every write that changes the text changes (semantic.status). The
declared slot is fresh when its vector hash equals the source hash. The
source hash carries the declared fingerprint, so the next slot keeps the
source hash it read instead, its guard, and is fresh while the guard still
equals the source hash: a row edited during a fill is pending in both
slots, and a vector of the old text is never taken for the new one's.

A slot gives the worker what it claims, reads and writes, and a search what
it compares: the encoder, the columns as expressions, the states as Qs.
Nothing here talks to Celery; the encoder loads only when it encodes.
"""

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.backends.utils import names_digest
from django.db.models import CharField, F, Q, TextField
from django.db.models.expressions import Expression
from django.db.models.lookups import Exact, IsNull, StartsWith

from semantic import status
from semantic.encoders import get_encoder
from semantic.hashing import content_hash

# Suffixes of the next slot's columns, after the field's column name.
NEXT_COLUMNS = {"vector": "__next", "vector_hash": "__next_hash", "guard": "__next_guard", "error": "__next_error"}
HASH = CharField()
TEXT = TextField()


class SlotColumn(Expression):
    """A column of a model's table that no field of the model declares (a next slot's), as ``"alias"."column"``.

    It takes the alias of the query's base table when resolved, so it can
    stand wherever ``F()`` of a field would: filters, annotations, values().
    """

    def __init__(self, column, output_field, alias=None):
        super().__init__(output_field=output_field)
        self.column = column
        self.alias = alias

    def resolve_expression(self, query=None, allow_joins=True, reuse=None, summarize=False, for_save=False):
        copy = self.copy()
        if query is not None and copy.alias is None:
            copy.alias = query.get_initial_alias()
        return copy

    def relabeled_clone(self, relabels):
        return type(self)(self.column, self.output_field, relabels.get(self.alias, self.alias))

    def as_sql(self, compiler, connection):
        quote = compiler.quote_name_unless_alias
        return f"{quote(self.alias)}.{quote(self.column)}", []

    def get_group_by_cols(self):
        return [self]

    @property
    def identity(self):
        return (type(self), self.column, self.alias)

    def __eq__(self, other):
        return isinstance(other, SlotColumn) and other.identity == self.identity

    def __hash__(self):
        return hash(self.identity)


class Slot:
    """The declared slot of ``field``: its own columns and chunk model, its ``model=`` alias's encoder.

    The attributes below are the interface the worker and the search use;
    ``NextSlot`` gives them for the columns and tables of a switch.
    """

    is_next = False

    def __init__(self, field):
        self.field = field

    def __repr__(self):
        return f"<{type(self).__name__} {self.label}>"

    def __eq__(self, other):
        return type(other) is type(self) and other.key == self.key

    def __hash__(self):
        return hash(self.key)

    @property
    def key(self):
        """What tells slots apart (caches of resolved SQL are keyed by it)."""
        return (self.field.model, self.field.name, self.is_next, self.alias, self.dimensions)

    @property
    def label(self):
        return f"{self.field.model._meta.label}.{self.field.name}"

    # --- the configuration -------------------------------------------------------

    @property
    def alias(self):
        return self.field.model_alias

    @property
    def encoder(self):
        return get_encoder(self.alias)

    @property
    def dimensions(self):
        return self.field.dimensions

    @property
    def fingerprint(self):
        """The prefix of this slot's vector hashes (see EmbeddingField.fingerprint)."""
        return self.field.fingerprint

    def text_hash(self, text):
        return content_hash(self.fingerprint, text)

    def verify_encoder(self):
        """Raise ImproperlyConfigured unless the loaded model makes vectors of this slot's size."""
        self.field.verify_encoder()

    @property
    def vector_type(self):
        """The SQL type of this slot's vectors, e.g. ``vector(384)``."""
        return self.field.storage_type.db_type(self.dimensions)

    # --- where the vectors are ---------------------------------------------------------

    @property
    def chunked(self):
        return self.field.chunk_model is not None

    @property
    def chunk_model(self):
        """The model class of the field's chunks: it reads this slot's chunk rows too (same columns)."""
        return self.field.chunk_model

    @property
    def chunk_table(self):
        return self.field.chunk_model._meta.db_table if self.chunked else None

    def column_name(self, part):
        """The owner table's column of ``part``: "vector", "vector_hash", "guard" (the source hash) or "error"."""
        meta = self.field.model._meta
        attname = {
            "vector": self.field.attname,
            "vector_hash": self.field.vector_hash_attname,
            "guard": self.field.source_hash_attname,
            "error": self.field.error_attname,
        }[part]
        return meta.get_field(attname).column

    def chunks_by_id(self, ids, using="default"):
        """{id: chunk model instance} of this slot's chunks with those ids."""
        return self.chunk_model._default_manager.using(using).in_bulk(ids)

    def vector(self):
        """The row's vector in this slot, as an expression."""
        return F(self.field.attname)

    def vector_hash(self):
        return F(self.field.vector_hash_attname)

    @property
    def lock_key(self):
        """What the claim's advisory locks are namespaced by (semantic.worker.lock_namespace)."""
        return f"{self.field.model._meta.db_table}.{self.field.column}"

    # --- states ----------------------------------------------------------------------------

    def status_q(self, state):
        return status.status_q(self.field, state)

    def pending_q(self):
        return status.pending_q(self.field)

    def searchable_q(self):
        return status.searchable_q(self.field)

    def count_statuses(self, using="default"):
        return status.count_statuses(self.field, using=using)


class NextSlot(Slot):
    """The next slot of a switch: the owner table's ``<column>__next*`` columns and ``chunk_table``.

    ``alias`` and ``dimensions`` are the switch's (semantic.models.Switch).
    """

    is_next = True

    def __init__(self, field, alias, dimensions):
        super().__init__(field)
        self._alias = alias
        self._dimensions = int(dimensions)

    @property
    def label(self):
        return f"{super().label} (next: {self.alias})"

    @property
    def alias(self):
        return self._alias

    @property
    def dimensions(self):
        return self._dimensions

    @property
    def fingerprint(self):
        fingerprint = self.encoder.fingerprint
        if not self.chunked:
            return fingerprint
        from semantic.chunking import chunked_fingerprint

        return chunked_fingerprint(fingerprint, self.field.overlap)

    def verify_encoder(self):
        actual = self.encoder.model.get_embedding_dimension()
        if actual != self.dimensions:
            raise ImproperlyConfigured(
                f"{self.label} holds {self.dimensions}-dimensional vectors but model alias {self.alias!r} now makes "
                f"{actual}-dimensional ones: cancel the switch (semantic_prepare --cancel) and prepare it again."
            )

    @property
    def chunk_table(self):
        if not self.chunked:
            return None
        return next_table_name(self.field.chunk_model._meta.db_table, connections["default"].ops.max_name_length())

    def column_name(self, part):
        return f"{self.field.column}{NEXT_COLUMNS[part]}"

    def chunks_by_id(self, ids, using="default"):
        # The chunk model reads this table's rows (same columns); their ids are this table's.
        meta = self.chunk_model._meta
        quote = connections[using].ops.quote_name
        found = self.chunk_model._default_manager.using(using).raw(
            f"SELECT * FROM {quote(self.chunk_table)} WHERE {quote(meta.pk.column)} = ANY(%s)", [list(ids)]
        )
        return {chunk.pk: chunk for chunk in found}

    def _column(self, part, output_field):
        return SlotColumn(self.column_name(part), output_field)

    def vector(self):
        return self._column("vector", self.field.storage_type.field_class(dimensions=self.dimensions))

    def vector_hash(self):
        return self._column("vector_hash", HASH)

    def guard(self):
        return self._column("guard", HASH)

    def error(self):
        return self._column("error", TEXT)

    @property
    def lock_key(self):
        return f"{self.field.model._meta.db_table}.{self.column_name('vector')}"

    # --- states (the declared slot's table of states, read from the next columns) -----

    def _parts(self):
        source = F(self.field.source_hash_attname)
        has_text = Q(**{f"{self.field.source_hash_attname}__isnull": False})
        has_vector = Q(IsNull(self.vector(), False))
        has_error = Q(IsNull(self.error(), False))
        # The guard still is the row's source hash. Written out both ways:
        # SQL's NOT of a comparison with NULL (a guard never written) is
        # NULL, not true.
        current = Q(Exact(self.guard(), source))
        outdated = Q(IsNull(self.guard(), True)) | ~current
        of_this_configuration = Q(StartsWith(self.vector_hash(), self.fingerprint))
        return has_text, has_vector, has_error, current, outdated, of_this_configuration

    def status_q(self, state):
        """A Q for the rows in ``state`` of this slot (the states of semantic.status).

        fresh: the guard is the source hash and the vector is of this
        configuration; failed: the guard is the source hash and the text
        could not be encoded (set aside until the text changes: a next slot
        makes one attempt per text); stale: a vector of this configuration,
        made before the text last changed (or the text is gone); missing:
        text, no vector, the guard outdated; other model: a vector of
        another configuration (the alias's settings changed since the
        switch was prepared); no text: nothing to do.
        """
        has_text, has_vector, has_error, current, outdated, of_this_configuration = self._parts()
        if state == status.FRESH:
            return has_text & current & has_vector & of_this_configuration
        if state == status.FAILED:
            return has_text & current & ~has_vector & has_error
        if state == status.STALE:
            return has_vector & of_this_configuration & (~has_text | outdated)
        if state == status.MISSING:
            return has_text & ~has_vector & outdated
        if state == status.OUTDATED:
            return has_vector & ~of_this_configuration
        if state == status.NO_TEXT:
            return ~has_vector & (~has_text | (current & ~has_error))
        raise ValueError(f"Unknown embedding status {state!r}; one of {', '.join(status.STATES)}.")

    def pending_q(self):
        q = Q()
        for state in status.PENDING:
            q |= self.status_q(state)
        return q

    def searchable_q(self):
        has_text, has_vector, _, _, _, of_this_configuration = self._parts()
        return has_text & has_vector & of_this_configuration

    def count_statuses(self, using="default"):
        return status.count_statuses(self.field, using=using, state_q=self.status_q)


def next_table_name(table, max_length):
    """The next slot's chunk table for the declared chunk table ``table``, within PostgreSQL's name length."""
    name = f"{table}__next"
    if len(name) <= max_length:
        return name
    return f"{table[: max_length - 15]}_{names_digest(table, length=8)}__next"
