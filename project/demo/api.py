"""
The demo's REST API for JavaScript front ends, described by OpenAPI at /api/schema/.

``GET /api/articles/?search=mobile phone sales`` lists articles by meaning,
each with its score; ``&search_mode=hybrid``, ``&topic=tech``,
``&ordering=title``, ``&page=2``, ``&page_size=20`` combine with it.
``GET /api/articles/<id>/`` returns one article.
"""

from django.http import JsonResponse
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import routers, serializers, viewsets
from rest_framework.pagination import PageNumberPagination

from project.demo.models import Article
from semantic.contrib.rest_framework import (
    SemanticOrderingFilter,
    SemanticScoreField,
    SemanticSearchFilter,
    SemanticSearchRateThrottle,
)


class ArticleSerializer(serializers.ModelSerializer):
    score = SemanticScoreField(help_text="Similarity to the search (higher is closer); null without a search.")
    hybrid_score = SemanticScoreField(help_text="Fused rank score of a hybrid search; null otherwise.")

    class Meta:
        model = Article
        fields = ["id", "topic", "title", "body", "score", "hybrid_score"]


class ArticlePagination(PageNumberPagination):
    page_size = 10
    page_size_query_param = "page_size"
    max_page_size = 50


def _error(description, schema):
    return OpenApiResponse(response=schema, description=description)


DETAIL = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
# DRF's ValidationError for query parameters: {parameter: [message, ...]}.
BAD_PARAMETERS = {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}
NOT_FOUND = _error("No such article, or no such page.", DETAIL)
THROTTLED = _error("Too many searches from this address (SEMANTIC['SEARCH_RATE']); anonymous clients only.", DETAIL)


@extend_schema_view(
    list=extend_schema(
        responses={
            200: ArticleSerializer,
            400: _error("A parameter was refused: a search query too long or of control characters only, "
                        "an unknown search mode or topic filter value.", BAD_PARAMETERS),
            404: NOT_FOUND,
            429: THROTTLED,
        }
    ),
    retrieve=extend_schema(responses={200: ArticleSerializer, 404: NOT_FOUND, 429: THROTTLED}),
)
class ArticleViewSet(viewsets.ReadOnlyModelViewSet):
    """BBC News articles; ``?search=`` ranks them by meaning."""

    # The vector column is never shown: parsing it costs more than finding the rows.
    queryset = Article.objects.only("id", "topic", "title", "body")
    serializer_class = ArticleSerializer
    pagination_class = ArticlePagination
    # Filters first (a search ranks the articles of the topic), ordering last
    # (an explicit ?ordering= reorders the ranked results).
    filter_backends = [DjangoFilterBackend, SemanticSearchFilter, SemanticOrderingFilter]
    filterset_fields = ["topic"]
    ordering_fields = ["id", "title", "topic", "score"]
    # Without a search; a search keeps its rank order unless ?ordering= is given.
    ordering = ["id"]
    # Anonymous searches per address: SEMANTIC["SEARCH_RATE"].
    throttle_classes = [SemanticSearchRateThrottle]


router = routers.SimpleRouter()
router.register("articles", ArticleViewSet, basename="api-article")


def not_found(request, *args, **kwargs):
    """Any other URL under /api/: JSON, as the API's own 404s are, not the site's HTML page."""
    return JsonResponse({"detail": "Not found."}, status=404)
