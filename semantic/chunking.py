"""
Long texts: token-aware chunks, and the table that holds one vector per chunk.

A text longer than the model's ``max_seq_length`` is not silently truncated.
The worker splits it into windows of at most ``chunk_size`` tokens, where
neighbours share ``overlap`` tokens, encodes every window, and stores each in
the field's chunk table (``<owner table>_<field>_chunk``); the row's own
vector is the token-weighted mean of its chunk vectors (see docs/design.md,
"Long texts").

Splitting tokenizes the whole text once with the model's own fast tokenizer
(offsets, no special tokens) and maps each window back to character offsets,
so a chunk's text is always a slice of the row's text. Window edges move to
word starts where they can, so re-tokenizing a chunk gives the same tokens and
it fits the model without truncation.

The chunk table is an ordinary model, built for each (model, EmbeddingField)
with ``chunks=True`` when the owner class is prepared, the way
django-simple-history builds its historical models: ``makemigrations`` sees it
in the owner's app and writes it into that app's migrations.
"""

import sys
from dataclasses import dataclass

from django.apps import apps as global_apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, models
from django.db.backends.utils import names_digest, truncate_name
from pgvector.django import HnswIndex

from semantic.hashing import HASH_LENGTH, fingerprint

# Bumped when the splitting changes, so rows chunked the old way become stale.
CHUNKING_VERSION = 1
# Characters tokenized per call by Chunker.split_many: one call for many short
# texts, while the offsets of a few long ones stay a bounded amount of memory.
SPLIT_GROUP_CHARACTERS = 1_000_000
# The chunk table's HNSW build parameters unless the field names its own
# (EmbeddingField(chunk_index={...})). pgvector's defaults (m=16,
# ef_construction=64) gave recall@10 of ~0.91 at ef_search 100 over 400k
# chunks of 100k documents (docs/design.md, "The chunk index").
CHUNK_INDEX_DEFAULTS = {"m": 16, "ef_construction": 200}
# What pgvector accepts (its hnsw.h), so that a migration never carries an
# index PostgreSQL refuses to build; ef_construction must also be >= 2 * m.
CHUNK_INDEX_LIMITS = {"m": (2, 100), "ef_construction": (4, 1000)}


@dataclass(frozen=True)
class Chunk:
    """One window of a text: ``text == source[start:end]``, ``tokens`` long."""

    index: int
    start: int
    end: int
    text: str
    tokens: int


def _check_sizes(size, overlap):
    if not isinstance(overlap, int) or not isinstance(size, int) or not 0 <= overlap < size:
        raise ImproperlyConfigured(
            f"Chunk overlap must be an integer from 0 to one less than the chunk size ({size} tokens), not {overlap!r}."
        )


def _tokenize(tokenizer, texts):
    """The tokenizer's encodings of ``texts`` (a list), with character offsets and no special tokens."""
    try:
        batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as exc:
        raise ImproperlyConfigured(
            "Chunking needs a fast tokenizer (character offsets); this model's tokenizer has none. "
            "Use EmbeddingField(chunks=False) to truncate long texts instead."
        ) from exc
    return batch.encodings


def split_text(text, tokenizer, size, overlap):
    """Split ``text`` into chunks of at most ``size`` tokens sharing ``overlap`` tokens.

    ``tokenizer`` is a Hugging Face fast tokenizer (it must give offsets and
    word ids). A text of at most ``size`` tokens is one chunk: the whole text.
    Windows end before a word that would be cut, as long as that keeps them
    more than half full, and start at the beginning of a word; only a word
    longer than half a window is cut between tokens.
    """
    _check_sizes(size, overlap)
    if not text:
        return []
    (encoding,) = _tokenize(tokenizer, [text])
    return windows(text, encoding.offsets, encoding.word_ids, size, overlap)


def windows(text, offsets, word_ids, size, overlap):
    """The chunks of ``text`` given its tokens' character ``offsets`` and ``word_ids`` (see split_text)."""
    count = len(offsets)
    if count <= size:
        return [Chunk(0, 0, len(text), text, count)]

    def word_start(i):
        """The first token of the word token ``i`` belongs to."""
        word = word_ids[i]
        if word is None:
            return i
        while i > 0 and word_ids[i - 1] == word:
            i -= 1
        return i

    def next_word_start(i):
        """The first token at or after ``i`` that begins a word."""
        while i < count and word_ids[i] is not None and word_ids[i - 1] == word_ids[i]:
            i += 1
        return i

    chunks = []
    start = 0
    while True:
        end = min(start + size, count)
        if end < count:
            snapped = word_start(end)
            if snapped > start + size // 2:
                end = snapped
        first, last = offsets[start][0], offsets[end - 1][1]
        chunks.append(Chunk(len(chunks), first, last, text[first:last], end - start))
        if end >= count:
            return chunks
        # The next window shares at least ``overlap`` tokens, widened back to
        # the start of a word; when that word began before this window did,
        # it starts at the next word instead (less overlap, never a gap).
        following = max(end - overlap, start + 1)
        snapped = word_start(following)
        if snapped <= start:
            snapped = next_word_start(following)
            if snapped > end:
                snapped = following
        start = snapped


class Chunker:
    """Splits texts for one encoder: windows that fit its model after the prefix."""

    def __init__(self, encoder, overlap):
        model = encoder.model
        self.tokenizer = model.tokenizer
        limit = model.max_seq_length or self.tokenizer.model_max_length
        special = self.tokenizer.num_special_tokens_to_add(pair=False)
        prefix = encoder.config["document_prefix"]
        prefix_tokens = len(self.tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]) if prefix else 0
        self.size = limit - special - prefix_tokens
        self.overlap = overlap
        if not 0 <= overlap < self.size:
            raise ImproperlyConfigured(
                f"chunk_overlap={overlap} must be below the chunk size of model alias {encoder.alias!r}: "
                f"{self.size} tokens (max_seq_length {limit} minus {special} special token(s) and "
                f"{prefix_tokens} prefix token(s))."
            )

    def split(self, text):
        return split_text(text, self.tokenizer, self.size, self.overlap)

    def split_many(self, texts):
        """``[chunks or exception]`` for each of ``texts`` (non-empty), tokenized in few calls.

        One tokenizer call per group of texts (up to SPLIT_GROUP_CHARACTERS)
        instead of one per text. When a group's call fails, its texts are
        split one by one, so that the error is the one text's: it comes back
        in that text's place, and only ImproperlyConfigured (the model's,
        not a text's) is raised.
        """
        results = []
        for group in _groups(texts, SPLIT_GROUP_CHARACTERS):
            try:
                encodings = _tokenize(self.tokenizer, group)
            except ImproperlyConfigured:
                raise
            except Exception:
                encodings = None
            for position, text in enumerate(group):
                try:
                    if encodings is None:
                        results.append(self.split(text))
                    else:
                        encoding = encodings[position]
                        results.append(windows(text, encoding.offsets, encoding.word_ids, self.size, self.overlap))
                except ImproperlyConfigured:
                    raise
                except Exception as exc:
                    results.append(exc)
        return results


def _groups(texts, characters):
    """``texts`` in consecutive lists of at most ``characters`` characters (at least one text each)."""
    group, total = [], 0
    for text in texts:
        if group and total + len(text) > characters:
            yield group
            group, total = [], 0
        group.append(text)
        total += len(text)
    if group:
        yield group


def chunk_index_options(options):
    """The chunk index's HNSW parameters: CHUNK_INDEX_DEFAULTS with ``options`` (a dict, or None) over them.

    ValueError, naming what pgvector accepts, for anything else: an unknown
    key, a value that is not an integer in pgvector's range, or an
    ``ef_construction`` below ``2 * m``.
    """
    example = ", ".join(f"{key!r}: {value}" for key, value in CHUNK_INDEX_DEFAULTS.items())
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"chunk_index must be a dict such as {{{example}}} (the defaults), not {options!r}.")
    unknown = sorted(map(repr, set(options) - set(CHUNK_INDEX_DEFAULTS)))
    if unknown:
        raise ValueError(
            f"chunk_index has unknown key(s) {', '.join(unknown)}; it takes {' and '.join(map(repr, CHUNK_INDEX_DEFAULTS))} "
            f"(pgvector's HNSW build parameters, defaults {{{example}}})."
        )
    resolved = {**CHUNK_INDEX_DEFAULTS, **options}
    for key, (low, high) in CHUNK_INDEX_LIMITS.items():
        value = resolved[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"chunk_index[{key!r}] must be an integer from {low} to {high} (pgvector's limits), not {value!r}.")
    if resolved["ef_construction"] < 2 * resolved["m"]:
        raise ValueError(
            f"chunk_index['ef_construction'] must be at least 2 * m = {2 * resolved['m']} (pgvector refuses to build "
            f"the index otherwise), not {resolved['ef_construction']}."
        )
    return resolved


def chunked_fingerprint(encoder_fingerprint, overlap):
    """The row-hash fingerprint of a chunked field.

    A chunked row's vector depends on how the text was split, so turning
    chunking on or changing the overlap must make rows stale: the field's
    fingerprint covers both. Chunk hashes (the cache keys) keep the encoder's
    own fingerprint, since a chunk's vector is just the encoding of its text.
    """
    return fingerprint(encoder_fingerprint, f"chunks=v{CHUNKING_VERSION}", f"overlap={overlap}")


def weighted_mean(vectors, weights, normalize):
    """The row vector: chunk vectors averaged by token count, re-normalised if the model normalises.

    One chunk gives its own vector unchanged.
    """
    import numpy as np

    if len(vectors) == 1:
        return vectors[0]
    mean = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    if normalize:
        norm = np.linalg.norm(mean)
        if norm > 0:
            mean = mean / norm
    return mean.astype(np.float32)


class FieldStatement(models.BaseConstraint):
    """A Meta "constraint" that is really SQL about one field, so that migrations carry it.

    Subclasses give the SQL; this base names the field and lets the
    migration autodetector compare and serialise it.
    """

    def __init__(self, *, field, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.field = field

    def validate(self, model, instance, exclude=None, using=None):
        # Nothing to check in Python: the database does what the SQL says.
        return

    def deconstruct(self):
        path, args, kwargs = super().deconstruct()
        kwargs["field"] = self.field
        return path, args, kwargs

    def __eq__(self, other):
        if type(other) is type(self):
            return self.name == other.name and self.field == other.field
        return super().__eq__(other)


class OwnerCascade(FieldStatement):
    """``FOREIGN KEY (<field>) REFERENCES <owner> ON DELETE CASCADE``.

    Django 5.2 has no database-level ``on_delete`` (6.0 adds ``DB_CASCADE``),
    and the ORM's CASCADE runs in Python only: a raw ``DELETE`` of an owner
    row would fail on Django's own constraint. The chunk table's foreign key
    therefore has ``db_constraint=False`` and this constraint instead, so the
    database removes a row's chunks however the row is deleted.
    """

    def _definition(self, model, schema_editor):
        qn = schema_editor.quote_name
        foreign_key = model._meta.get_field(self.field)
        target = foreign_key.target_field
        return (
            f"CONSTRAINT {qn(self.name)} FOREIGN KEY ({qn(foreign_key.column)})"
            f" REFERENCES {qn(target.model._meta.db_table)} ({qn(target.column)})"
            f" ON DELETE CASCADE{schema_editor.connection.ops.deferrable_sql()}"
        )

    def constraint_sql(self, model, schema_editor):
        return self._definition(model, schema_editor)

    def create_sql(self, model, schema_editor):
        return f"ALTER TABLE {schema_editor.quote_name(model._meta.db_table)} ADD {self._definition(model, schema_editor)}"

    def remove_sql(self, model, schema_editor):
        qn = schema_editor.quote_name
        return f"ALTER TABLE {qn(model._meta.db_table)} DROP CONSTRAINT {qn(self.name)}"


class InlineStorage(FieldStatement):
    """``ALTER TABLE … ALTER COLUMN <field> SET STORAGE MAIN``: keep the column's values in the row.

    pgvector's types default to EXTERNAL storage: a chunk row (a 384-dim
    vector of 1.5 kB beside ~1.5 kB of text) passes PostgreSQL's 2 kB
    threshold, so its vector went to the TOAST table and every distance a
    scan computed fetched it from there (measured on the demo's chunk
    table: an exact search 2-4x slower). MAIN keeps values in the row
    unless the row cannot fit a page at all, when they still move out, so
    no vector is ever refused. The text column stays EXTENDED and moves out
    first. A Meta constraint so that migrations carry it: it has no
    constraint of its own, only the statement, run after the table exists.
    """

    def _statement(self, model, schema_editor, storage):
        qn = schema_editor.quote_name
        column = model._meta.get_field(self.field).column
        return f"ALTER TABLE {qn(model._meta.db_table)} ALTER COLUMN {qn(column)} SET STORAGE {storage}"

    def constraint_sql(self, model, schema_editor):
        # Inside CREATE TABLE there is no place for it: after the table.
        schema_editor.deferred_sql.append(self._statement(model, schema_editor, "MAIN"))
        return None

    def create_sql(self, model, schema_editor):
        return self._statement(model, schema_editor, "MAIN")

    def remove_sql(self, model, schema_editor):
        return self._statement(model, schema_editor, "EXTERNAL")


def chunk_model_name(owner, field_name):
    camel = "".join(part[:1].upper() + part[1:] for part in field_name.split("_") if part)
    return f"{owner.__name__}{camel}Chunk"


def make_chunk_model(field):
    """Build and register the chunk model of ``field`` (its owner class is prepared).

    Its ``embedding`` column has the field's storage (pgvector's VectorField
    or HalfVectorField, the field's dimensions) and its HNSW index the
    operator class of the field's metric on that storage and the field's
    build parameters (``field.chunk_index``: m and ef_construction).
    """
    owner = field.model
    meta = owner._meta
    name = chunk_model_name(owner, field.name)
    db_table = truncate_name(f"{meta.db_table}_{field.name}_chunk", connection.ops.max_name_length())
    # Index names must fit 30 characters (models.E034) and start with a letter.
    short = f"{meta.db_table[:13]}_{names_digest(db_table, length=8)}"
    if not short[0].isalpha():
        short = "c" + short[1:]
    # The chunk vectors are stored as the field's own (vector or halfvec),
    # and indexed with the operator class of its metric on that type.
    storage = field.storage_type
    try:
        opclass = field.opclass
    except ValueError:
        opclass = f"{storage.name}_cosine_ops"  # an unknown metric is the field's check to report

    class Meta:
        app_label = meta.app_label
        apps = meta.apps
        verbose_name = f"{meta.verbose_name} {field.name.replace('_', ' ')} chunk"
        constraints = [
            models.UniqueConstraint(fields=["owner", "index"], name=f"{short}_uniq"),
            OwnerCascade(field="owner", name=f"{short}_owner_fk"),
            InlineStorage(field="embedding", name=f"{short}_inline"),
        ]
        indexes = [HnswIndex(name=f"{short}_hnsw", fields=["embedding"], opclasses=[opclass], **field.chunk_index)]

    Meta.db_table = db_table

    attrs = {
        "__module__": owner.__module__,
        "__qualname__": name,
        "__doc__": f"One chunk of {meta.object_name}.{field.name}'s text and its vector (written by the worker).",
        "Meta": Meta,
        # The (owner, index) unique constraint serves lookups by owner;
        # OwnerCascade is the database-level foreign key.
        "owner": models.ForeignKey(
            owner,
            on_delete=models.CASCADE,
            related_name=f"{field.name}_chunks",
            db_constraint=False,
            db_index=False,
        ),
        "index": models.PositiveIntegerField(),
        # Character offsets of the chunk in the row's built source text.
        "start": models.PositiveIntegerField(),
        "end": models.PositiveIntegerField(),
        "text": models.TextField(),
        # Encoder fingerprint + sha256 of the chunk text: its cache key.
        "text_hash": models.CharField(max_length=HASH_LENGTH),
        "embedding": storage.field_class(dimensions=field.dimensions),
        "__str__": lambda self: f"{self.owner_id}#{self.index}",
    }
    model = type(name, (models.Model,), attrs)
    module = sys.modules.get(owner.__module__)
    if meta.apps is global_apps and module is not None and not hasattr(module, name):
        # Importable (and picklable) like a model written by hand.
        setattr(module, name, model)
    return model
