"""The demo's pages: the library's search view over the articles, and an article page with similar articles."""

import django_filters
from django.shortcuts import get_object_or_404, render

from project.demo.models import Article
from semantic.status import FRESH, count_statuses
from semantic.views import SemanticSearchView


def topic_choices():
    return [(topic, topic) for topic in Article.objects.order_by("topic").values_list("topic", flat=True).distinct()]


class ArticleFilter(django_filters.FilterSet):
    # A choice, not free text: an unknown topic is a message, not an empty page.
    topic = django_filters.ChoiceFilter(choices=topic_choices, empty_label="All topics")

    class Meta:
        model = Article
        fields = ["topic"]


class ArticleSearchView(SemanticSearchView):
    """semantic.views.SemanticSearchView as a site uses it: a model, a filter, a template that extends the library's."""

    model = Article
    filterset_class = ArticleFilter
    template_name = "demo/search.html"

    def get_context_data(self, **kwargs):
        counts = count_statuses(Article._meta.get_field("embedding"))
        return super().get_context_data(total=counts["rows"], embedded=counts[FRESH], **kwargs)


search = ArticleSearchView.as_view()


def article(request, pk):
    """One article, and the articles nearest to it ({% similar_items %} in the template)."""
    return render(request, "demo/article.html", {"article": get_object_or_404(Article, pk=pk)})
