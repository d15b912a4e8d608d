"""
Django REST framework: search by meaning as a filter backend, beside DRF's ``SearchFilter``.

::

    from semantic.contrib.rest_framework import (
        SemanticOrderingFilter, SemanticScoreField, SemanticSearchFilter, SemanticSearchRateThrottle)

    class ArticleSerializer(serializers.ModelSerializer):
        score = SemanticScoreField()          # null when the request searched nothing

        class Meta:
            model = Article
            fields = ["id", "title", "topic", "score"]

    class ArticleViewSet(viewsets.ReadOnlyModelViewSet):
        queryset = Article.objects.all()      # a SemanticManager's QuerySet
        serializer_class = ArticleSerializer
        filter_backends = [DjangoFilterBackend, SemanticSearchFilter, SemanticOrderingFilter]
        filterset_fields = ["topic"]
        ordering_fields = ["title", "topic", "score"]
        throttle_classes = [SemanticSearchRateThrottle]   # SEMANTIC["SEARCH_RATE"], anonymous searches

``GET /articles/?search=mobile phone sales`` lists the rows closest in
meaning, best first, each with its ``score``; ``&search_mode=hybrid`` fuses
the vector ranking with PostgreSQL full-text ranking
(``QuerySet.hybrid_search``). Without ``?search=`` (or with a blank one) the
list is untouched.

DRF applies filter backends in list order, so the order above matters:

* filters before the search narrow what it ranks (the top k *within* the
  topic); after it they only drop rows from the top k;
* an ordering after the search sees the ranked rows: an explicit
  ``?ordering=`` wins (with rank as the tie-break under
  ``SemanticOrderingFilter``), otherwise rank order stays. Before the search
  an ordering is discarded: a search orders by relevance.

The search runs once per request and yields at most ``k`` rows (the view's
``semantic_search_k``, default 100); what the filter returns is a plain lazy
QuerySet of exactly those rows, annotated with the search's values and
ordered by ``search_rank``, so pagination counts and slices it cheaply,
without searching again. Importing this module needs djangorestframework;
nothing else in ``semantic`` imports it.
"""

from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.template import loader
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.filters import BaseFilterBackend, OrderingFilter
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from semantic.conf import semantic_settings
from semantic.ratelimits import over_search_rate
from semantic.retrieval.options import check_k, clean_query
from semantic.retrieval.pinned import RANK, pinned

SEARCH_MODES = ("semantic", "hybrid")
_FLOAT, _INTEGER = models.FloatField(), models.IntegerField()
# What each mode annotates on its results (the names the ORM search
# annotates), with their SQL types.
MODE_ANNOTATIONS = {
    "semantic": {"distance": _FLOAT, "score": _FLOAT},
    "hybrid": {"hybrid_score": _FLOAT, "vector_rank": _INTEGER, "text_rank": _INTEGER, "distance": _FLOAT, "score": _FLOAT},
}
SEARCH_ANNOTATIONS = frozenset({RANK}.union(*MODE_ANNOTATIONS.values()))


class SemanticSearchFilter(BaseFilterBackend):
    """Rank the queryset by meaning when the request has ``?search=``.

    Query parameters: ``search`` (``search_param``; DRF's SEARCH_PARAM
    setting, like SearchFilter) and ``search_mode`` (``search_mode_param``):
    "semantic" (default) or "hybrid". A missing or blank ``search`` passes
    the queryset through untouched. Otherwise the queryset (a
    SemanticQuerySet, already narrowed by the backends before this one) is
    searched once and replaced by a lazy QuerySet of its top rows, annotated
    ``search_rank``, ``distance`` and ``score`` (hybrid also
    ``hybrid_score``, ``vector_rank``, ``text_rank``) and ordered by
    ``search_rank``.

    The view may set ``semantic_search_field`` (the EmbeddingField; default
    the model's only one), ``semantic_search_k`` (rows a search yields in
    all, default ``default_k`` = 100, at most SEMANTIC["MAX_K"]), and
    ``semantic_search_options`` / ``hybrid_search_options`` (more keyword
    arguments of ``semantic_search`` / ``hybrid_search``, such as
    ``{"min_score": 0.2}`` or ``{"text_fields": ["title"]}``).

    A query the library refuses (longer than SEMANTIC["QUERY_MAX_CHARS"],
    nothing left once control characters are removed) and an unknown mode
    are a 400 (ValidationError, keyed by the parameter's name), never a 500.
    """

    search_param = api_settings.SEARCH_PARAM
    search_mode_param = "search_mode"
    search_modes = SEARCH_MODES
    default_mode = "semantic"
    default_k = 100
    template = "rest_framework/filters/search.html"

    def is_search(self, request):
        """Whether ``request`` asks for a search (a non-blank search parameter), valid or not."""
        return bool(request.query_params.get(self.search_param, "").strip())

    def get_search_query(self, request):
        """The cleaned query text, or None when there is none to search; ValidationError when refused."""
        if not self.is_search(request):
            return None
        try:
            return clean_query(request.query_params[self.search_param])
        except ValueError as exc:
            raise ValidationError({self.search_param: [str(exc)]}) from None

    def get_search_mode(self, request):
        """The requested mode (blank means ``default_mode``); ValidationError for any other value."""
        mode = request.query_params.get(self.search_mode_param) or self.default_mode
        if mode not in self.search_modes:
            # The value is not echoed: it is whatever a client sent, of any length.
            raise ValidationError(
                {self.search_mode_param: [f"Unknown search mode; choose one of {', '.join(self.search_modes)}."]}
            )
        return mode

    def get_k(self, view):
        k = getattr(view, "semantic_search_k", self.default_k)
        try:
            if k is None:
                raise ValueError("it bounds what one request can make the server rank, so it cannot be None.")
            check_k(k)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{type(view).__name__}.semantic_search_k: {exc}") from None
        return k

    def filter_queryset(self, request, queryset, view):
        # The mode is checked even without a query: a bad parameter is a 400
        # whether or not the search box was empty.
        mode = self.get_search_mode(request)
        query = self.get_search_query(request)
        if query is None:
            return queryset
        if not hasattr(queryset, "semantic_search"):
            raise ImproperlyConfigured(
                f"{type(view).__name__}'s queryset is a {type(queryset).__name__}; "
                "SemanticSearchFilter needs a SemanticQuerySet (give the model a SemanticManager)."
            )
        return pinned(queryset, self.rank(queryset, query, mode, view), RANK, types=MODE_ANNOTATIONS[mode])

    def rank(self, queryset, query, mode, view):
        """Run the search: its rows best first, as ``[(pk, {annotation: value}), ...]``.

        The values are those of MODE_ANNOTATIONS[mode]. Override to search
        differently; keep at most ``get_k(view)`` rows.
        """
        field = getattr(view, "semantic_search_field", None)
        k = self.get_k(view)
        names = list(MODE_ANNOTATIONS[mode])
        if mode == "hybrid":
            options = getattr(view, "hybrid_search_options", None) or {}
            # Only the ranking is read here (the paginator fetches the page's
            # rows later): no columns, no related rows.
            rows = queryset.select_related(None).prefetch_related(None).only("pk")
            return [
                (row.pk, {name: getattr(row, name) for name in names})
                for row in rows.hybrid_search(query, field=field, k=k, **options)
            ]
        options = getattr(view, "semantic_search_options", None) or {}
        rows = queryset.semantic_search(query, field=field, k=k, **options).values_list("pk", *names)
        return [(pk, dict(zip(names, values))) for pk, *values in rows]

    def get_schema_operation_parameters(self, view):
        """OpenAPI 3 parameters, for DRF's schema generator and drf-spectacular."""
        return [
            {
                "name": self.search_param,
                "required": False,
                "in": "query",
                "description": (
                    "Rank the results by meaning: the most relevant first, each with its score. "
                    "Control characters count as spaces; a query of nothing else is refused (400). "
                    f"At most {semantic_settings.QUERY_MAX_CHARS} characters; blank means no search."
                ),
                "schema": {"type": "string", "maxLength": semantic_settings.QUERY_MAX_CHARS},
            },
            {
                "name": self.search_mode_param,
                "required": False,
                "in": "query",
                "description": (
                    "semantic: by meaning alone. hybrid: meaning and keywords "
                    "(PostgreSQL full-text rank) fused by reciprocal rank fusion."
                ),
                "schema": {"type": "string", "enum": list(self.search_modes), "default": self.default_mode},
            },
        ]

    def to_html(self, request, queryset, view):
        # DRF's own search box, for the browsable API.
        context = {"param": self.search_param, "term": request.query_params.get(self.search_param, "")}
        return loader.get_template(self.template).render(context)


class SemanticOrderingFilter(OrderingFilter):
    """OrderingFilter that leaves a semantic search's rank order alone unless ``?ordering=`` asks otherwise.

    Put it after SemanticSearchFilter. On ranked results: a valid
    ``?ordering=`` wins, with the rank as the tie-break; without one the
    view's default ``ordering`` is not applied (relevance is the order a
    search asked for). Ordering terms naming a search's annotations
    (``score``, ``search_rank``, …) are accepted only where a search made
    them, and ignored elsewhere, instead of failing in the database.
    Elsewhere it behaves as OrderingFilter.
    """

    def get_ordering(self, request, queryset, view):
        params = request.query_params.get(self.ordering_param)
        if params:
            ordering = self.remove_invalid_fields(queryset, [param.strip() for param in params.split(",")], view, request)
            if ordering:
                return ordering
        if _is_ranked(queryset):
            return None
        return self.get_default_ordering(view)

    def remove_invalid_fields(self, queryset, fields, view, request):
        available = queryset.query.annotations
        return [
            term
            for term in super().remove_invalid_fields(queryset, fields, view, request)
            if term.lstrip("-") not in SEARCH_ANNOTATIONS or term.lstrip("-") in available
        ]

    def filter_queryset(self, request, queryset, view):
        ordering = self.get_ordering(request, queryset, view)
        if not ordering:
            return queryset
        if _is_ranked(queryset):
            ordering = [*ordering, RANK]
        return queryset.order_by(*ordering)


class SemanticSearchRateThrottle(BaseThrottle):
    """Anonymous searches per client address: SEMANTIC["SEARCH_RATE"] (django-ratelimit's "30/m"; None: no limit).

    Only requests that search count (a non-blank search parameter of one of
    the view's SemanticSearchFilter backends), valid or not: a search runs
    the encoder in the web process, listing and paging do not. Signed-in
    users are not limited. Counted per view by django-ratelimit (required
    while a rate is set) with the cache's atomic INCR: DRF's own throttles
    keep each client's timestamps in the cache as a pickled list, and
    nothing pickled should be read back from a shared Redis.
    """

    def get_rate(self, view):
        """The rate for ``view``: override for a rate of its own."""
        return semantic_settings.SEARCH_RATE

    def allow_request(self, request, view):
        if not _searches(request, view):
            return True
        group = f"semantic.rest_framework:{type(view).__module__}.{type(view).__qualname__}"
        return not over_search_rate(request, group, self.get_rate(view))


def _searches(request, view):
    return any(
        isinstance(backend, type) and issubclass(backend, SemanticSearchFilter) and backend().is_search(request)
        for backend in getattr(view, "filter_backends", ())
    )


class SemanticScoreField(serializers.FloatField):
    """A result's ``score`` (similarity, higher is closer): read-only, null when the request searched nothing.

    Name it ``score`` or pass ``source=`` ("hybrid_score", "distance", …).
    In hybrid mode a row found by its words alone has no vector score: null.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("read_only", True)
        # DRF answers a missing attribute with None for a nullable field:
        # rows listed without a search carry no score.
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)


def _is_ranked(queryset):
    return RANK in queryset.query.annotations
