"""
SemanticQuerySet: similarity search that composes with the ORM.

::

    Article.objects.filter(topic="tech").semantic_search("new phones")[:10]
    Article.objects.semantic_search("new phones").filter(score__gte=0.3)[:10]

``semantic_search`` returns an ordinary, unsliced QuerySet ordered by
distance, with ``distance`` and ``score`` annotated, so any filter can be
added before or after; slice it (or pass ``k``) to take the top results.
"""

from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import models
from django.db.models import ExpressionWrapper, FloatField, Value
from pgvector.django import CosineDistance

from semantic.fields import STALE_MARKER, EmbeddingField, embedding_fields
from semantic.signals import schedule_embedding


class SemanticQuerySet(models.QuerySet):
    """QuerySet with semantic search, and bulk writes that keep vectors fresh.

    Django sends no signal for ``bulk_create``, ``bulk_update`` and
    ``update``; these overrides mark the affected rows stale and wake a
    worker, so every way of changing a row through the ORM ends with a fresh
    vector. (Raw SQL is caught by the periodic sweep.)
    """

    def bulk_create(self, objs, *args, **kwargs):
        fields = embedding_fields(self.model)
        update_fields = kwargs.get("update_fields")
        if kwargs.get("update_conflicts") and update_fields:
            # An upsert rewrites only update_fields of existing rows: the
            # source hashes must be among them when their text is.
            extra = [f.source_hash_attname for f in fields if f.touched_by(update_fields)]
            kwargs["update_fields"] = [*update_fields, *(n for n in extra if n not in update_fields)]
        created = super().bulk_create(objs, *args, **kwargs)
        self._wake(fields)
        return created

    def bulk_update(self, objs, fields, batch_size=None):
        objs = list(objs)
        touched = [f for f in embedding_fields(self.model) if f.touched_by(fields)]
        extra = []
        for field in touched:
            for obj in objs:
                setattr(obj, field.source_hash_attname, field.compute_source_hash(obj))
            extra.append(field.source_hash_attname)
        rows = super().bulk_update(objs, [*fields, *(n for n in extra if n not in fields)], batch_size=batch_size)
        for field in touched:
            # Rows whose text became empty lose their vector.
            emptied = [obj.pk for obj in objs if getattr(obj, field.source_hash_attname) is None]
            if emptied:
                self.model._base_manager.using(self.db).filter(pk__in=emptied).update(**field.source_hash_update(None))
        self._wake(touched)
        return rows

    def update(self, **kwargs):
        touched = [f for f in embedding_fields(self.model) if f.touched_by(kwargs)]
        for field in touched:
            # The new text is only known row by row; the worker hashes it.
            kwargs.setdefault(field.source_hash_attname, STALE_MARKER)
        rows = super().update(**kwargs)
        if rows:
            self._wake(touched)
        return rows

    update.alters_data = True

    def mark_stale(self, field=None):
        """Mark the rows stale so the worker re-embeds them; returns the row count."""
        fields = embedding_fields(self.model) if field is None else [self._embedding_field(field)]
        rows = super().update(**{f.source_hash_attname: STALE_MARKER for f in fields})
        if rows:
            self._wake(fields)
        return rows

    mark_stale.alters_data = True

    def _wake(self, fields):
        for field in fields:
            schedule_embedding(self.model, field.name, using=self.db)

    def _embedding_field(self, name):
        if name is None:
            fields = embedding_fields(self.model)
            if len(fields) != 1:
                names = ", ".join(f.name for f in fields) or "none"
                raise ImproperlyConfigured(
                    f"{self.model.__name__} has {len(fields)} embedding fields ({names}); pass field=."
                )
            return fields[0]
        try:
            field = self.model._meta.get_field(name)
        except FieldDoesNotExist:
            field = None
        if not isinstance(field, EmbeddingField):
            raise ImproperlyConfigured(f"{self.model.__name__}.{name} is not an EmbeddingField.")
        return field

    def semantic_search(self, query, *, field=None, k=None, min_score=None):
        """Rows ordered by cosine distance to the embedding of ``query``.

        Annotates ``distance`` (cosine distance, 0 = same direction) and
        ``score`` (1 - distance, cosine similarity). Rows without a vector are
        left out. ``k`` slices the result (no further filtering after that,
        as with any sliced QuerySet); ``min_score`` keeps rows at least that
        similar. Raises ValueError for an empty query or a k below 1.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("semantic_search() needs a non-empty query string.")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer, not {k!r}.")
        embedding_field = self._embedding_field(field)
        vector = embed_query(embedding_field, query)
        return self.nearest(vector, field=embedding_field.name, k=k, min_score=min_score)

    def nearest(self, vector, *, field=None, k=None, min_score=None):
        """Like semantic_search, for a query vector already computed."""
        embedding_field = self._embedding_field(field)
        distance = CosineDistance(embedding_field.name, vector)
        queryset = (
            self.filter(**{f"{embedding_field.name}__isnull": False})
            .annotate(distance=distance)
            .annotate(score=ExpressionWrapper(Value(1.0) - models.F("distance"), output_field=FloatField()))
            .order_by("distance")
        )
        if min_score is not None:
            queryset = queryset.filter(distance__lte=1.0 - float(min_score))
        return queryset[:k] if k is not None else queryset


def embed_query(field, query):
    """The query's embedding under ``field``'s encoder, from the cache when seen before."""
    from semantic import cache as embedding_cache
    from semantic.encoders import clean_text

    encoder = field.encoder
    text = clean_text(query)
    key = encoder.text_hash(text, query=True)
    cached = embedding_cache.get_vectors([key])
    if key in cached:
        return cached[key]
    field.verify_encoder()
    vectors, failed = encoder.encode([text], query=True)
    if failed:
        raise RuntimeError("The query could not be encoded: the device ran out of memory.")
    vector = vectors[0]
    embedding_cache.set_vectors({key: vector})
    return vector


class SemanticManager(models.Manager.from_queryset(SemanticQuerySet)):
    """Manager exposing semantic_search() and nearest() on ``Model.objects``."""
