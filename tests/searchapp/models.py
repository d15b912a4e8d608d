"""Read-path test models: each with a real HNSW index, as production tables have."""

from django.db import models
from pgvector.django import HnswIndex

from semantic import EmbeddingField, SemanticManager


class Passage(models.Model):
    """Tiny-model vectors; ``bucket`` (0-999) makes filters of known selectivity."""

    text = models.TextField()
    bucket = models.IntegerField(db_index=True)

    embedding = EmbeddingField(source="text", model="tiny", chunks=False)

    objects = SemanticManager()

    class Meta:
        indexes = [HnswIndex(name="passage_embedding_hnsw", fields=["embedding"], opclasses=["vector_cosine_ops"])]


class Headline(models.Model):
    """BBC headlines with real all-MiniLM-L6-v2 vectors (recall against an exact oracle)."""

    title = models.CharField(max_length=300)
    topic = models.CharField(max_length=20)

    embedding = EmbeddingField(source="title", chunks=False)

    objects = SemanticManager()

    class Meta:
        indexes = [HnswIndex(name="headline_embedding_hnsw", fields=["embedding"], opclasses=["vector_cosine_ops"])]


class IpPassage(models.Model):
    """Inner-product metric with its matching index."""

    text = models.TextField()

    embedding = EmbeddingField(source="text", model="tiny", metric="inner_product", chunks=False)

    objects = SemanticManager()

    class Meta:
        indexes = [HnswIndex(name="ippassage_embedding_hnsw", fields=["embedding"], opclasses=["vector_ip_ops"])]


class ChunkedPassage(models.Model):
    """Rows of several chunks (the chunk table carries its HNSW index); ``bucket`` as in Passage."""

    text = models.TextField()
    bucket = models.IntegerField(db_index=True)

    embedding = EmbeddingField(source="text", model="tiny")

    objects = SemanticManager()


class HalfPassage(models.Model):
    """Passage's twin stored as float16 (``storage="halfvec"``), with its HNSW index on halfvec_cosine_ops."""

    text = models.TextField()
    bucket = models.IntegerField(db_index=True)

    embedding = EmbeddingField(source="text", model="tiny", chunks=False, storage="halfvec")

    objects = SemanticManager()

    class Meta:
        indexes = [HnswIndex(name="halfpassage_embedding_hnsw", fields=["embedding"], opclasses=["halfvec_cosine_ops"])]


class HalfChunkedPassage(models.Model):
    """A chunked halfvec field: the chunk table's column and HNSW index are halfvec too (16-token model: many chunks)."""

    text = models.TextField()
    bucket = models.IntegerField(db_index=True)

    embedding = EmbeddingField(source="text", model="tiny_short", chunk_overlap=4, storage="halfvec")

    objects = SemanticManager()

    class Meta:
        indexes = [HnswIndex(name="halfchunked_embedding_hnsw", fields=["embedding"], opclasses=["halfvec_cosine_ops"])]


class HalfHeadline(models.Model):
    """Headline's twin stored as halfvec: bench/halfvec.py compares the two at 100k rows."""

    title = models.CharField(max_length=300)
    topic = models.CharField(max_length=20)

    embedding = EmbeddingField(source="title", chunks=False, storage="halfvec")

    objects = SemanticManager()

    class Meta:
        indexes = [HnswIndex(name="halfheadline_embedding_hnsw", fields=["embedding"], opclasses=["halfvec_cosine_ops"])]
