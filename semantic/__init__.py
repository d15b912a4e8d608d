"""
semantic: semantic search over Django models with pgvector.

Declare an EmbeddingField over some text fields, give the model a
SemanticManager, run a Celery worker, and search with
``Model.objects.semantic_search("query")``, or across several models with
``semantic.search("query", models=[Article, FAQ])``.
"""

from semantic.fields import EmbeddingField
from semantic.querysets import SemanticManager, SemanticQuerySet
from semantic.retrieval.across_models import search
from semantic.tables import FillFactor

__all__ = [
    "EmbeddingField",
    "FillFactor",
    "SemanticManager",
    "SemanticQuerySet",
    "search",
    "SemanticAdminMixin",
    "EmbeddingStatusFilter",
]

# The admin names load django.contrib.admin: only when asked for, so that
# importing semantic (while apps load, or without the admin) stays light.
_ADMIN_NAMES = {"SemanticAdminMixin", "EmbeddingStatusFilter"}


def __getattr__(name):
    if name in _ADMIN_NAMES:
        from semantic import admin

        return getattr(admin, name)
    raise AttributeError(f"module 'semantic' has no attribute {name!r}")
