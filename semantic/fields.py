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

The field adds two hidden columns beside the vector:

* ``<name>_source_hash``: fingerprint + sha256 of the row's current source
  text, written by every save (no model is loaded for it);
* ``<name>_vector_hash``: the same value for the text the stored vector was
  computed from, written only by the worker together with the vector.

A row is stale when the two differ, or when its hashes carry the fingerprint
of another encoder configuration. Staleness lives in PostgreSQL, so no broker
outage can lose work. The vector and its hash are owned by the worker: an
ordinary ``save()`` of an existing row leaves both as they are in the
database, so a save made from an instance loaded before the worker finished
never rolls a vector back.

With ``chunks=True`` (the default) a text longer than the model's
``max_seq_length`` is split into overlapping token windows stored one vector
each in the field's chunk table (``field.chunk_model``, see
semantic.chunking); ``chunks=False`` truncates long texts instead.
"""

from django.core import checks
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import models
from django.db.models import F
from django.db.models.signals import class_prepared
from pgvector.django import VectorField

from semantic.conf import semantic_settings
from semantic.encoders import FINGERPRINT_LENGTH, HASH_LENGTH, clean_text, get_encoder

SOURCE_SEPARATOR = "\n\n"
# A source hash that matches no text: the row is stale and the worker
# re-hashes its text. Written where the new text is not known in Python
# (QuerySet.update, mark_stale, raw SQL: SET <field>_source_hash = 'stale').
STALE_MARKER = "stale"


class EmbeddingHashField(models.CharField):
    """A hidden hash column added by EmbeddingField.

    Migrations list it as a field of its own; when such a migration state is
    rendered, EmbeddingField has already added it, so adding it twice is
    skipped here.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_length", HASH_LENGTH)
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", True)
        kwargs["editable"] = False
        super().__init__(*args, **kwargs)

    def contribute_to_class(self, cls, name, **kwargs):
        if any(field.name == name for field in cls._meta.local_fields):
            return
        super().contribute_to_class(cls, name, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("editable", None)
        return name, path, args, kwargs


class VectorHashField(EmbeddingHashField):
    """Hash of the text the stored vector came from; written by the worker."""

    def __init__(self, *args, embedding_field_name=None, **kwargs):
        self.embedding_field_name = embedding_field_name
        super().__init__(*args, **kwargs)

    def source_hash_update(self, new_hash):
        """Column values that give a row ``new_hash``; a row without text loses its vector."""
        values = {self.source_hash_attname: new_hash}
        if new_hash is None:
            values.update({self.attname: None, self.vector_hash_attname: None})
        return values

    def pre_save(self, model_instance, add):
        field = _embedding_field_of(model_instance, self.embedding_field_name)
        return field.worker_owned_value(model_instance, self.attname, add) if field else super().pre_save(model_instance, add)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs["embedding_field_name"] = self.embedding_field_name
        return name, path, args, kwargs


def _embedding_field_of(instance, name):
    try:
        field = instance._meta.get_field(name)
    except FieldDoesNotExist:
        return None
    return field if isinstance(field, EmbeddingField) else None


class EmbeddingField(VectorField):
    """A vector computed by a background worker from ``source``.

    ``source`` is a field or attribute name, a list of them (joined with blank
    lines, empty ones skipped; a name of a method is called), or a callable
    taking the instance and returning the text. ``model`` names an alias in
    ``SEMANTIC["MODELS"]``. ``dimensions`` defaults to that alias's declared
    dimensions. A row whose text is empty or whitespace-only has no vector.

    ``chunks=True`` (the default): a text longer than the model's
    ``max_seq_length`` is split into windows of tokens sharing
    ``chunk_overlap`` tokens (default ``SEMANTIC["CHUNK_OVERLAP"]``), one
    vector each in ``chunk_model``, and the row's vector is their
    token-weighted mean. ``chunks=False``: the model truncates long texts
    and there is no chunk table.
    """

    description = "Embedding of the row's text (pgvector)"

    def __init__(self, *args, source=None, model="default", dimensions=None, metric="cosine", chunks=True, chunk_overlap=None, **kwargs):
        self.source = source
        self.model_alias = model
        self.chunks = chunks
        self.chunk_overlap = chunk_overlap
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

    def contribute_to_class(self, cls, name, **kwargs):
        super().contribute_to_class(cls, name, **kwargs)
        if cls._meta.abstract:
            # Concrete children receive copies of this field and add the
            # hash columns to themselves.
            return
        EmbeddingHashField().contribute_to_class(cls, f"{name}_source_hash")
        VectorHashField(embedding_field_name=name).contribute_to_class(cls, f"{name}_vector_hash")
        if self.chunks and not _is_historical(cls):
            # The chunk model's foreign key needs the finished owner class.
            # Historical models (migrations) get their chunk model from the
            # migration that created it, not from here.
            class_prepared.connect(self._make_chunk_model, sender=cls, weak=False)

    def _make_chunk_model(self, sender, **kwargs):
        from semantic.chunking import make_chunk_model

        class_prepared.disconnect(self._make_chunk_model, sender=sender)
        self.chunk_model = make_chunk_model(self)

    def deconstruct(self):
        # source, model, chunks and chunk_overlap are behaviour, not schema
        # (the chunk table is a model of its own): leaving them out keeps
        # migrations free of callables and of churn when they change.
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("editable", None)
        if kwargs.get("null") is True:
            del kwargs["null"]
        if kwargs.get("blank") is True:
            del kwargs["blank"]
        return name, path, args, kwargs

    @property
    def encoder(self):
        return get_encoder(self.model_alias)

    @property
    def overlap(self):
        """Tokens shared by neighbouring chunks (the field's, else CHUNK_OVERLAP)."""
        return semantic_settings.CHUNK_OVERLAP if self.chunk_overlap is None else self.chunk_overlap

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
        return self.fingerprint + self.encoder.text_hash(text)[FINGERPRINT_LENGTH:]

    @property
    def opclass(self):
        """The index operator class for this field's metric, e.g. for HnswIndex(opclasses=[...])."""
        from semantic.distances import get_metric

        return get_metric(self.metric).opclass

    # --- text and hashing ---------------------------------------------------

    def source_names(self):
        """The attribute names the text is built from ([] for a callable)."""
        if isinstance(self.source, str):
            return [self.source]
        if isinstance(self.source, (list, tuple)):
            return list(self.source)
        return []

    def touched_by(self, field_names):
        """Whether writing ``field_names`` may change this field's text."""
        if callable(self.source):
            return True
        names = set(field_names)
        for name in self.source_names():
            if name in names:
                return True
            try:
                if self.model._meta.get_field(name).attname in names:
                    return True
            except FieldDoesNotExist:
                # A property or method: it may read any field.
                return True
        return False

    def build_text(self, instance):
        """The cleaned source text of ``instance`` ('' when it has none)."""
        if self.source is None:
            return ""
        if callable(self.source):
            value = self.source(instance)
            return clean_text("" if value is None else str(value))
        parts = []
        for name in self.source_names():
            value = getattr(instance, name)
            if callable(value):
                value = value()
            if value is None:
                continue
            value = clean_text(str(value))
            if value:
                parts.append(value)
        return SOURCE_SEPARATOR.join(parts)

    def compute_source_hash(self, instance):
        """The hash the row should carry now, or None when it has no text."""
        text = self.build_text(instance)
        return self.text_hash(text) if text else None

    def source_hash_update(self, new_hash):
        """Column values that give a row ``new_hash``; a row without text loses its vector."""
        values = {self.source_hash_attname: new_hash}
        if new_hash is None:
            values.update({self.attname: None, self.vector_hash_attname: None})
        return values

    def pre_save(self, model_instance, add):
        if self.source is not None:
            setattr(model_instance, self.source_hash_attname, self.compute_source_hash(model_instance))
        return self.worker_owned_value(model_instance, self.attname, add)

    def worker_owned_value(self, instance, attname, add):
        """What a save writes to the vector or its hash column.

        A row without text has neither. Otherwise an insert writes what the
        instance holds (normally nothing) and an update keeps the database's
        value: only the worker writes vectors.
        """
        if getattr(instance, self.source_hash_attname) is None:
            setattr(instance, attname, None)
            return None
        if add:
            return getattr(instance, attname)
        return F(attname)

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
        """semantic.E006 (unknown metric), W001 (no vector index), W002 (index of another metric)."""
        from semantic.distances import METRICS

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
        if not vector_indexes:
            return [
                checks.Warning(
                    f"{self.model.__name__}.{self.name} has no vector index: every search scans the whole table.",
                    hint=(
                        "Add to Meta: indexes = [HnswIndex(name=\"%s_%s_hnsw\", fields=[\"%s\"], "
                        "opclasses=[\"%s\"])] (from pgvector.django import HnswIndex), then makemigrations."
                        % (self.model._meta.model_name[:14], self.name[:9], self.name, self.opclass)
                    ),
                    obj=self,
                    id="semantic.W001",
                )
            ]
        wrong = [index.name for index in vector_indexes if self.opclass not in getattr(index, "opclasses", ())]
        if len(wrong) == len(vector_indexes):
            return [
                checks.Warning(
                    f"{self.model.__name__}.{self.name} searches by {self.metric} distance, but its vector "
                    f"index ({', '.join(wrong)}) is built for another operator class, so searches cannot use it.",
                    hint=f"Build the index with opclasses=[{self.opclass!r}].",
                    obj=self,
                    id="semantic.W002",
                )
            ]
        return []

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
        missing = [n for n in self.source_names() if not _has_attribute(self.model, n)]
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


def _has_attribute(model, name):
    try:
        model._meta.get_field(name)
        return True
    except FieldDoesNotExist:
        return hasattr(model, name)


def embedding_fields(model):
    """The EmbeddingFields of a model class, in declaration order."""
    return [f for f in model._meta.get_fields() if isinstance(f, EmbeddingField)]
