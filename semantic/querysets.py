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

from semantic.fields import EmbeddingField, embedding_fields


class SemanticQuerySet(models.QuerySet):
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
    vector = encoder.encode([text], query=True)[0]
    embedding_cache.set_vectors({key: vector})
    return vector


class SemanticManager(models.Manager.from_queryset(SemanticQuerySet)):
    """Manager exposing semantic_search() and nearest() on ``Model.objects``."""
