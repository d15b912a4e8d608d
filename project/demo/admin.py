from django.contrib import admin

from project.demo.models import Article
from semantic import SemanticAdminMixin


@admin.register(Article)
class ArticleAdmin(SemanticAdminMixin, admin.ModelAdmin):
    """The search box ranks articles by meaning (keyword search one click away);
    the mixin adds the Relevance and Embedding status columns, a status filter,
    the Re-embed / Mark stale actions and a read-only vector on the change page."""

    list_display = ["title", "topic"]
    list_filter = ["topic"]
    search_fields = ["title", "body"]
