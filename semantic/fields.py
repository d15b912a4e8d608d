"""
EmbeddingField: a pgvector column kept in step with some text of its row.

::

    class Article(models.Model):
        title = models.CharField(max_length=200)
        body = models.TextField()
        embedding = EmbeddingField(source=["title", "body"])

        objects = SemanticManager()

        class Meta:
            indexes = [HnswIndex(name="article_embedding_hnsw", fields=["embedding"],
                                 opclasses=["vector_cosine_ops"])]

The field adds hidden columns beside the vector:

* ``<name>_source_hash``: what the row's text is now. Every save writes the
  hash of the text (fingerprint + sha256; no model is loaded for it) in the
  same statement as the text; a write whose new text Python does not know
  writes a stale mark instead (semantic.hashing);
* ``<name>_vector_hash``: the hash of the text the stored vector was made
  from, written only by the worker, together with the vector;
* ``<name>_failed_hash``, ``<name>_attempts``, ``<name>_error``: the source
  hash whose text the worker failed to encode, how often, and why.

What these mean (fresh, stale, missing, failed, ...) is defined once, in
semantic.status. Staleness lives in PostgreSQL, so no broker outage can lose
work. The vector and the columns after it are owned by the worker: a save
never writes them, so a save made from an instance loaded before the worker
finished never rolls a vector back.

With ``chunks=True`` (the default) a text longer than the model's
``max_seq_length`` is split into overlapping token windows stored one vector
each in the field's chunk table (``field.chunk_model``, see
semantic.chunking); ``chunks=False`` truncates long texts instead.

``chunk_index={"m": 16, "ef_construction": 200}`` sets the chunk table's
HNSW build parameters (those are the defaults, semantic.chunking); the
chunk model's index carries them, so ``makemigrations`` rebuilds it when
they change.

``storage="halfvec"`` stores 16-bit floats (pgvector ``halfvec``) in the
row's column and in the chunk table: half the bytes, and indexable up to
4,000 dimensions instead of 2,000; the index then needs the halfvec operator
class (``field.opclass``, e.g. ``halfvec_cosine_ops``).
"""

from django.core import checks
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import models
from django.db.models import F
from django.db.models.signals import class_prepared
from pgvector.django import VectorField

from semantic.conf import semantic_settings
from semantic.encoders import get_encoder
from semantic.hashing import HASH_LENGTH, clean_text, content_hash, new_stale_mark
from semantic.relations import attribute_text, has_attribute, is_path, parse_path, path_text, with_related

SOURCE_SEPARATOR = "\n\n"


def worker_owned_value(field, instance, add):
    """What a save writes to a column only the worker writes.

    An insert writes the column's default (a new row has no vector yet),
    an update writes the column to itself: a save from an instance loaded
    before the worker finished must not roll the worker's values back.
    """
    if add:
        value = field.get_default()
        setattr(instance, field.attname, value)
        return value
    return F(field.attname)


class HiddenColumn:
    """A column an EmbeddingField adds beside its vector; never in forms."""

    def __init__(self, *args, **kwargs):
        kwargs["editable"] = False
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("editable", None)
        return name, path, args, kwargs

    def embedding_field(self, model):
        """The EmbeddingField of ``model`` this column belongs to (None in migration states)."""
        for field in embedding_fields(model):
            if self.name in field.hidden_column_names:
                return field
        return None


class WorkerOwned(HiddenColumn):
    """A hidden column only the worker writes (see worker_owned_value)."""

    def pre_save(self, model_instance, add):
        return worker_owned_value(self, model_instance, add)


class HashColumn(HiddenColumn, models.CharField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_length", HASH_LENGTH)
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        super().__init__(*args, **kwargs)


class EmbeddingHashField(HashColumn):
    """``<field>_source_hash``: the hash of the row's current source text, written by every save.

    Computed here, from the instance, whenever the column is written, so
    ``save()`` writes the text and its hash in one statement.
    """

    def pre_save(self, model_instance, add):
        field = self.embedding_field(type(model_instance))
        if field is not None and field.source is not None:
            setattr(model_instance, self.attname, field.saved_source_hash(model_instance))
        return super().pre_save(model_instance, add)


class WorkerHashField(WorkerOwned, HashColumn):
    """``<field>_failed_hash``: the source hash whose text the worker failed to encode."""


class VectorHashField(WorkerHashField):
    """``<field>_vector_hash``: the hash of the text the stored vector was made from."""

    def __init__(self, *args, embedding_field_name=None, **kwargs):
        # Kept for the migrations that name it; the column finds its field by name.
        self.embedding_field_name = embedding_field_name
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs["embedding_field_name"] = self.embedding_field_name
        return name, path, args, kwargs


class AttemptsField(WorkerOwned, models.PositiveSmallIntegerField):
    """``<field>_attempts``: how many times the worker failed to encode the text of ``<field>_failed_hash``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("default", 0)
        # Also in the table: rows inserted with raw SQL get it too.
        kwargs.setdefault("db_default", 0)
        super().__init__(*args, **kwargs)


class ErrorField(WorkerOwned, models.TextField):
    """``<field>_error``: why the worker could not encode the text of ``<field>_failed_hash``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        super().__init__(*args, **kwargs)


class EmbeddingField(VectorField):
    """A vector computed by a background worker from ``source``.

    ``source`` is a field or attribute name, a list of them (joined with blank
    lines, empty ones skipped; a name of a method is called), or a callable
    taking the instance and returning the text. A name may follow relations
    as a query lookup does (``"author__name"``, ``"tags__name"``; many values
    are joined by ", " in primary-key order), and ``depends_on`` lists the
    relation paths a callable reads: either way, a change to those related
    rows marks exactly the rows that reach them stale (semantic.relations,
    semantic.triggers). ``model`` names an alias in ``SEMANTIC["MODELS"]``. ``dimensions`` defaults to that alias's declared
    dimensions. A row whose text is empty or whitespace-only has no vector.

    ``chunks=True`` (the default): a text longer than the model's
    ``max_seq_length`` is split into windows of tokens sharing
    ``chunk_overlap`` tokens (default ``SEMANTIC["CHUNK_OVERLAP"]``), one
    vector each in ``chunk_model``, and the row's vector is their
    token-weighted mean. A text of more than ``max_chunks`` windows (default
    ``SEMANTIC["MAX_CHUNKS"]``) is not encoded: its row is marked failed.
    ``chunks=False``: the model truncates long texts and there is no chunk
    table.

    ``chunk_index``: the chunk table's HNSW build parameters, a dict with
    ``m`` and/or ``ef_construction`` over semantic.chunking's
    CHUNK_INDEX_DEFAULTS; a key pgvector does not take, a value outside its
    limits or ``ef_construction < 2 * m`` is a ValueError, as is a
    ``chunk_index`` with ``chunks=False`` (there is no chunk table).

    ``storage`` is the column type: ``"vector"`` (float32, the default) or
    ``"halfvec"`` (float16: the worker's vectors are rounded to the nearest
    float16 when written, and so is the query vector when compared). Values
    read back as lists of floats either way. Anything else is a ValueError.
    """

    description = "Embedding of the row's text (pgvector)"

    def __init__(
        self,
        *args,
        source=None,
        model="default",
        dimensions=None,
        metric="cosine",
        chunks=True,
        chunk_overlap=None,
        max_chunks=None,
        storage="vector",
        chunk_index=None,
        depends_on=(),
        **kwargs,
    ):
        from semantic.chunking import chunk_index_options
        from semantic.distances import get_storage

        # Raised here, not left to a check: the column type depends on it,
        # and migrations would be written with a type that does not exist.
        self.storage = get_storage(storage).name
        # Likewise: the chunk model's index (and so its migration) carries these.
        if chunk_index is not None and not chunks:
            raise ValueError("chunk_index sets the chunk table's index, and a field with chunks=False has no chunk table.")
        self.chunk_index = chunk_index_options(chunk_index)
        self.source = source
        self.depends_on = tuple(depends_on)
        self._related_paths = None
        self.model_alias = model
        self.chunks = chunks
        self.chunk_overlap = chunk_overlap
        self.max_chunks_per_row = max_chunks
        # The model class holding this field's chunks; set once the owner
        # class is prepared (None for chunks=False and abstract models).
        self.chunk_model = None
        # Searches rank by this metric; the field's index needs the
        # matching operator class (``field.opclass``).
        self.metric = metric
        if dimensions is None:
            dimensions = _declared_dimensions(model)
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        kwargs["editable"] = False
        super().__init__(*args, dimensions=dimensions, **kwargs)

    # --- model wiring -------------------------------------------------------

    @property
    def source_hash_attname(self):
        return f"{self.name}_source_hash"

    @property
    def vector_hash_attname(self):
        return f"{self.name}_vector_hash"

    @property
    def failed_hash_attname(self):
        return f"{self.name}_failed_hash"

    @property
    def attempts_attname(self):
        return f"{self.name}_attempts"

    @property
    def error_attname(self):
        return f"{self.name}_error"

    @property
    def hidden_column_names(self):
        return (
            self.source_hash_attname,
            self.vector_hash_attname,
            self.failed_hash_attname,
            self.attempts_attname,
            self.error_attname,
        )

    def contribute_to_class(self, cls, name, **kwargs):
        super().contribute_to_class(cls, name, **kwargs)
        if cls._meta.abstract or _is_historical(cls):
            # Concrete children receive copies of this field and add the
            # columns to themselves. A model rendered from migrations has
            # exactly the columns its migrations created, and its chunk
            # model comes from the migration that created it.
            return
        for column, hidden in zip(
            self.hidden_column_names,
            (EmbeddingHashField(), VectorHashField(embedding_field_name=name), WorkerHashField(), AttemptsField(), ErrorField()),
        ):
            hidden.contribute_to_class(cls, column)
        if self.chunks:
            # The chunk model's foreign key needs the finished owner class.
            class_prepared.connect(self._make_chunk_model, sender=cls, weak=False)

    def _make_chunk_model(self, sender, **kwargs):
        from semantic.chunking import make_chunk_model

        class_prepared.disconnect(self._make_chunk_model, sender=sender)
        self.chunk_model = make_chunk_model(self)

    def deconstruct(self):
        # source, depends_on, model, chunks and chunk_overlap are behaviour, not schema
        # (the chunk table is a model of its own): leaving them out keeps
        # migrations free of callables and of churn when they change. The
        # chunk_index is schema, but of the chunk table: its HnswIndex
        # deconstructs with m and ef_construction in the chunk model's
        # migration, so repeating it here would only alter this column for
        # nothing.
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("editable", None)
        # Schema. Left out at its default, so migrations written before it
        # existed still describe their fields exactly.
        if self.storage != "vector":
            kwargs["storage"] = self.storage
        if kwargs.get("null") is True:
            del kwargs["null"]
        if kwargs.get("blank") is True:
            del kwargs["blank"]
        return name, path, args, kwargs

    # --- the column: pgvector's vector or halfvec -----------------------------

    @property
    def storage_type(self):
        """The Storage (semantic.distances) of this field's column."""
        from semantic.distances import get_storage

        return get_storage(self.storage)

    def db_type(self, connection):
        return self.storage_type.db_type(self.dimensions)

    def from_db_value(self, value, expression, connection):
        return self.storage_type.value_class._from_db(value)

    def to_python(self, value):
        if isinstance(value, list):
            return value
        return self.storage_type.value_class._from_db(value)

    def get_prep_value(self, value):
        return self.storage_type.value_class._to_db(value)

    @property
    def encoder(self):
        return get_encoder(self.model_alias)

    @property
    def overlap(self):
        """Tokens shared by neighbouring chunks (the field's, else CHUNK_OVERLAP)."""
        return semantic_settings.CHUNK_OVERLAP if self.chunk_overlap is None else self.chunk_overlap

    @property
    def max_chunks(self):
        """Chunks a row may have (the field's, else MAX_CHUNKS); a longer text fails."""
        return semantic_settings.MAX_CHUNKS if self.max_chunks_per_row is None else self.max_chunks_per_row

    @property
    def fingerprint(self):
        """The prefix of this field's row hashes.

        The encoder's fingerprint, or for a chunked field one that also
        covers the chunking (version and overlap): changing either makes
        every row stale, as changing the model does.
        """
        fingerprint = self.encoder.fingerprint
        if self.chunk_model is None:
            return fingerprint
        from semantic.chunking import chunked_fingerprint

        return chunked_fingerprint(fingerprint, self.overlap)

    def text_hash(self, text):
        """The row hash of ``text``: this field's fingerprint + sha256 of the text."""
        return content_hash(self.fingerprint, text)

    @property
    def opclass(self):
        """The index operator class for this field's metric and storage, e.g. for HnswIndex(opclasses=[...])."""
        return self.opclass_for(self.storage)

    def opclass_for(self, storage):
        """The index operator class for this field's metric on a ``storage`` column."""
        from semantic.distances import get_metric

        return get_metric(self.metric).opclass_for(storage)

    # --- text and hashing ---------------------------------------------------

    def source_names(self):
        """The attribute names the text is built from ([] for a callable)."""
        if isinstance(self.source, str):
            return [self.source]
        if isinstance(self.source, (list, tuple)):
            return list(self.source)
        return []

    def related_paths(self):
        """The SourcePaths of the names in ``source`` and ``depends_on`` that follow relations.

        Parsed once the models are ready; an invalid path raises ValueError
        (semantic.E001 reports it).
        """
        if self._related_paths is None:
            names = [*self.source_names(), *self.depends_on]
            self._related_paths = tuple(parse_path(self.model, name) for name in dict.fromkeys(names) if is_path(name))
        return self._related_paths

    @property
    def follows_relations(self):
        """Whether the text depends on other tables' rows (see semantic.relations)."""
        return any(is_path(name) for name in (*self.source_names(), *self.depends_on))

    def touched_by(self, field_names):
        """Whether writing ``field_names`` may change this field's text."""
        if callable(self.source):
            return True
        names = set(field_names)
        for name in self.source_names():
            if is_path(name):
                # The row's own part of a path: the foreign key of its first hop.
                name = name.split("__", 1)[0]
            if name in names:
                return True
            try:
                if self.model._meta.get_field(name).attname in names:
                    return True
            except FieldDoesNotExist:
                # A property or a method: it may read any field.
                return True
        return False

    def text_columns(self):
        """The columns the text is built from, or None when it depends on more (a callable, a property)."""
        names = self.source_names()
        if not names or not all(is_column(self.model, name) for name in names):
            return None
        return names

    def text_written_by(self, field_names):
        """Whether writing ``field_names`` writes every column the text is built from.

        Only then can the text's hash be written in the same statement: with
        some source columns left out, the row's text mixes the values written
        with values only the database knows.
        """
        columns = self.text_columns()
        if columns is None:
            return False
        names = set(field_names)
        return all(name in names or self.model._meta.get_field(name).attname in names for name in columns)

    def load_for_text(self, queryset, *extra):
        """``queryset`` loading what ``build_text`` needs (plus ``extra`` fields), never the vector."""
        columns = self.text_columns()
        if columns is None:
            return with_related(queryset.defer(self.attname), self.related_paths())
        return queryset.only("pk", *columns, *extra)

    def build_text(self, instance):
        """The cleaned source text of ``instance`` ('' when it has none)."""
        if self.source is None:
            return ""
        if callable(self.source):
            value = self.source(instance)
            return clean_text("" if value is None else str(value))
        paths = {path.name: path for path in self.related_paths()}
        parts = [
            path_text(instance, paths[name]) if name in paths else attribute_text(instance, name)
            for name in self.source_names()
        ]
        return SOURCE_SEPARATOR.join(part for part in parts if part)

    def compute_source_hash(self, instance):
        """The hash the row should carry now, or None when it has no text."""
        text = self.build_text(instance)
        return self.text_hash(text) if text else None

    def saved_source_hash(self, instance):
        """What ``save()`` writes as the source hash: the text's hash, or a stale mark.

        A text that follows relations is not known from the row being
        saved (the related rows in memory may be outdated, a new row's
        many-to-many is added after it is saved): the worker reads it.
        """
        if self.follows_relations:
            return new_stale_mark()
        return self.compute_source_hash(instance)

    def pre_save(self, model_instance, add):
        # The vector is the worker's (the source hash column hashes the text).
        return worker_owned_value(self, model_instance, add)

    # --- checks ---------------------------------------------------------------

    def check(self, **kwargs):
        return [
            *super().check(**kwargs),
            *self._check_source(),
            *self._check_model(),
            *self._check_chunks(),
            *self._check_index(),
        ]

    def _check_index(self):
        """semantic.E006 (unknown metric), E008 (too many dimensions), E009 (index of the other storage),
        W001 (no vector index), W002 (index of another metric)."""
        from semantic.distances import METRICS, opclass_storage

        if self.metric not in METRICS:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} has unknown metric {self.metric!r}.",
                    hint=f"Use one of: {', '.join(METRICS)}.",
                    obj=self,
                    id="semantic.E006",
                )
            ]
        vector_indexes = [
            index
            for index in self.model._meta.indexes
            if self.name in getattr(index, "fields", ()) and type(index).__name__ in ("HnswIndex", "IvfflatIndex")
        ]
        too_large = self._check_dimensions(vector_indexes)
        if too_large:
            return too_large
        if not vector_indexes:
            return [
                checks.Warning(
                    f"{self.model.__name__}.{self.name} has no vector index: every search scans the whole table.",
                    hint=(
                        "Add to Meta: indexes = [HnswIndex(name=\"%s_%s_hnsw\", fields=[\"%s\"], "
                        "opclasses=[\"%s\"])] (from pgvector.django import HnswIndex), then makemigrations."
                        % (self.model._meta.model_name[:14], self.name[:9], self.name, self.opclass)
                    )
                    + self._index_limit_hint(),
                    obj=self,
                    id="semantic.W001",
                )
            ]
        # An operator class of the other column type is not merely unused:
        # PostgreSQL refuses to build it ("operator class ... does not
        # accept data type ..."), so migrate fails. An error, per index.
        errors = []
        same_storage = []
        for index in vector_indexes:
            other = [o for o in getattr(index, "opclasses", ()) if opclass_storage(o) not in (None, self.storage)]
            if not other:
                same_storage.append(index)
                continue
            errors.append(
                checks.Error(
                    f"{self.model.__name__}.{self.name} stores {self.storage}, but its vector index {index.name} "
                    f"uses {other[0]}, an operator class for {opclass_storage(other[0])} columns: "
                    f"migrate cannot build it.",
                    hint=f"Build the index with opclasses=[{self.opclass!r}] (storage={self.storage!r}, metric={self.metric!r}).",
                    obj=self,
                    id="semantic.E009",
                )
            )
        wrong = [index.name for index in same_storage if self.opclass not in getattr(index, "opclasses", ())]
        if same_storage and len(wrong) == len(same_storage):
            errors.append(
                checks.Warning(
                    f"{self.model.__name__}.{self.name} searches by {self.metric} distance, but its vector "
                    f"index ({', '.join(wrong)}) is built for another operator class, so searches cannot use it.",
                    hint=f"Build the index with opclasses=[{self.opclass!r}].",
                    obj=self,
                    id="semantic.W002",
                )
            )
        return errors

    def _check_dimensions(self, vector_indexes):
        """semantic.E008: more dimensions than the column type holds, or than its indexes accept.

        A chunked field always has an index: its chunk table's HNSW index.
        """
        from semantic.distances import MAX_DIMENSIONS

        if not isinstance(self.dimensions, int):
            return []  # semantic.E003
        label = f"{self.model.__name__}.{self.name}"
        if self.dimensions > MAX_DIMENSIONS:
            return [
                checks.Error(
                    f"{label} has {self.dimensions:,} dimensions; a pgvector column holds at most {MAX_DIMENSIONS:,}.",
                    hint="Use a model that makes smaller vectors.",
                    obj=self,
                    id="semantic.E008",
                )
            ]
        limit = self.storage_type.index_dimensions
        if self.dimensions <= limit or not (vector_indexes or self.chunks):
            return []
        indexed = ", ".join([index.name for index in vector_indexes] + (["the chunk table's HNSW index"] if self.chunks else []))
        return [
            checks.Error(
                f"{label} has {self.dimensions:,} dimensions, but pgvector indexes {self.storage} columns of "
                f"at most {limit:,}: migrate cannot build {indexed}.",
                hint=self._index_limit_hint().strip(),
                obj=self,
                id="semantic.E008",
            )
        ]

    def _index_limit_hint(self):
        """What to do when the dimensions exceed what the storage can index ('' when they do not)."""
        from semantic.distances import STORAGES

        if not isinstance(self.dimensions, int) or self.dimensions <= self.storage_type.index_dimensions:
            return ""
        halfvec = STORAGES["halfvec"].index_dimensions
        if self.storage == "vector" and self.dimensions <= halfvec:
            return (
                f" pgvector indexes vector columns of up to {self.storage_type.index_dimensions:,} dimensions and "
                f"halfvec columns of up to {halfvec:,}: pass storage='halfvec' (and opclasses=[{self.opclass_for('halfvec')!r}])."
            )
        return (
            f" pgvector indexes no column of more than {halfvec:,} dimensions: use a model that makes smaller "
            f"vectors, or chunks=False and no vector index (every search then scans the whole table)."
        )

    def _check_source(self):
        if self.source is None:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} has no source.",
                    hint="Pass source=['title', 'body'] (field or attribute names) or a callable.",
                    obj=self,
                    id="semantic.E001",
                )
            ]
        invalid = []
        names = self.depends_on if callable(self.source) else (*self.source_names(), *self.depends_on)
        for name in names:
            if not isinstance(name, str):
                invalid.append(f"{name!r} is not a name")
            elif is_path(name):
                try:
                    parse_path(self.model, name)
                except ValueError as exc:
                    invalid.append(str(exc))
        if invalid:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} has source paths that do not resolve: {' '.join(invalid)}",
                    hint="A path follows relations as a query lookup does, e.g. 'author__name' or 'tags__name'.",
                    obj=self,
                    id="semantic.E001",
                )
            ]
        if callable(self.source):
            return []
        if not self.source_names() or not all(isinstance(n, str) for n in self.source_names()):
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} source must be a name, a list of names or a callable.",
                    obj=self,
                    id="semantic.E001",
                )
            ]
        missing = [n for n in self.source_names() if not is_path(n) and not has_attribute(self.model, n)]
        if missing:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} source names missing attribute(s): {', '.join(missing)}.",
                    hint=f"Each source must be a field, property or method of {self.model.__name__}.",
                    obj=self,
                    id="semantic.E001",
                )
            ]
        return []

    def _check_model(self):
        try:
            config = semantic_settings.model_config(self.model_alias)
        except ImproperlyConfigured as exc:
            return [checks.Error(str(exc), hint="Add the alias to SEMANTIC['MODELS'].", obj=self, id="semantic.E002")]
        if self.dimensions is None:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} has no dimensions.",
                    hint=f"Pass dimensions=N, or declare 'dimensions' for model alias {self.model_alias!r}.",
                    obj=self,
                    id="semantic.E003",
                )
            ]
        if config["dimensions"] is not None and config["dimensions"] != self.dimensions:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} has {self.dimensions} dimensions but model alias "
                    f"{self.model_alias!r} makes {config['dimensions']}-dimensional vectors.",
                    hint="Make the field's dimensions match the model, then make a migration.",
                    obj=self,
                    id="semantic.E004",
                )
            ]
        return []

    def _check_chunks(self):
        if not self.chunks:
            return []
        max_chunks = self.max_chunks
        if not isinstance(max_chunks, int) or isinstance(max_chunks, bool) or max_chunks < 1:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} max_chunks must be a positive integer, not {max_chunks!r}.",
                    hint="Pass max_chunks=N to the field, or set SEMANTIC['MAX_CHUNKS'].",
                    obj=self,
                    id="semantic.E007",
                )
            ]
        overlap = self.overlap
        if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} chunk_overlap must be a non-negative integer, not {overlap!r}.",
                    obj=self,
                    id="semantic.E005",
                )
            ]
        try:
            limit = semantic_settings.model_config(self.model_alias)["max_seq_length"]
        except ImproperlyConfigured:
            return []  # reported by _check_model
        if limit and overlap >= limit:
            # The exact chunk size (less special and prefix tokens) needs the
            # tokenizer, so the worker checks it; this catches the plain mistake.
            return [
                checks.Error(
                    f"{self.model.__name__}.{self.name} chunk_overlap={overlap} is not below model alias "
                    f"{self.model_alias!r}'s max_seq_length ({limit}).",
                    hint="Pass a smaller chunk_overlap, or chunks=False to truncate long texts.",
                    obj=self,
                    id="semantic.E005",
                )
            ]
        return []

    def verify_encoder(self):
        """Raise ImproperlyConfigured unless the loaded model fits this column."""
        actual = self.encoder.model.get_embedding_dimension()
        if actual != self.dimensions:
            raise ImproperlyConfigured(
                f"{self.model._meta.label}.{self.name} has {self.dimensions} dimensions but model alias "
                f"{self.model_alias!r} makes {actual}-dimensional vectors. Make the field's dimensions "
                f"match the model, then make a migration."
            )


def _is_historical(model):
    """Whether ``model`` was rendered from migration state."""
    from django.db.migrations.state import StateApps

    return isinstance(model._meta.apps, StateApps)


def _declared_dimensions(alias):
    try:
        return semantic_settings.model_config(alias)["dimensions"]
    except ImproperlyConfigured:
        # Reported by the field's system check (semantic.E002), not at import.
        return None


def is_column(model, name):
    """Whether ``name`` is a concrete field (a column) of ``model``."""
    try:
        return model._meta.get_field(name).concrete
    except FieldDoesNotExist:
        return False


def field_label(field):
    """'app_label.Model.field': how the management commands, switches and logs name a field."""
    return f"{field.model._meta.label}.{field.name}"


def embedding_fields(model):
    """The EmbeddingFields of a model class, in declaration order."""
    return [f for f in model._meta.get_fields() if isinstance(f, EmbeddingField)]


def get_embedding_field(model, name=None):
    """The EmbeddingField ``name`` of ``model`` (its only one when None); ImproperlyConfigured otherwise."""
    fields = embedding_fields(model)
    label = model._meta.label
    if not fields:
        raise ImproperlyConfigured(f"{label} has no EmbeddingField.")
    names = ", ".join(f.name for f in fields)
    if name is None:
        if len(fields) == 1:
            return fields[0]
        raise ImproperlyConfigured(f"{label} has {len(fields)} embedding fields ({names}): name the one to use.")
    for field in fields:
        if field.name == name:
            return field
    raise ImproperlyConfigured(f"{label} has no embedding field {name!r} (it has: {names}).")
