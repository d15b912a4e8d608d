"""
semantic: semantic search over Django models with pgvector.

Declare an EmbeddingField over some text fields, give the model a
SemanticManager, run a Celery worker, and search with
``Model.objects.semantic_search("query")``.
"""

from semantic.fields import EmbeddingField
from semantic.querysets import SemanticManager, SemanticQuerySet

__all__ = ["EmbeddingField", "SemanticManager", "SemanticQuerySet"]
