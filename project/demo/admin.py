from django.contrib import admin

from project.demo.models import Article


@admin.register(Article)
class ArticleAdmin(admin.ModelAdmin):
    list_display = ["title", "topic", "has_embedding"]
    list_filter = ["topic"]
    search_fields = ["title"]

    @admin.display(boolean=True, description="Embedded")
    def has_embedding(self, obj):
        return obj.embedding is not None
