"""
SemanticSearchView: a site's public search page for one model, in one URL pattern.

::

    path("search/", SemanticSearchView.as_view(model=Article, filter_fields=["topic"]))

Every parameter is a visitor's input. A query the library refuses (too
long, only control characters), an unknown mode, a filter value that does
not validate, or a visitor over SEMANTIC["SEARCH_RATE"] gets the page back
with a message and a 4xx status, never an error page.
"""

from django.contrib.postgres.search import SearchQuery
from django.core.exceptions import ImproperlyConfigured
from django.core.paginator import Paginator
from django.views.generic.base import ContextMixin, TemplateResponseMixin, View

from semantic.conf import semantic_settings
from semantic.fields import get_embedding_field
from semantic.forms import MODES, SemanticSearchForm
from semantic.highlight import attach_snippets
from semantic.ratelimits import over_search_rate
from semantic.retrieval.across_models import search as search_across_models
from semantic.retrieval.hybrid import text_ranking, text_search_document

# Sentinel: "take the value from SEMANTIC".
FROM_SETTINGS = object()


class SemanticSearchView(TemplateResponseMixin, ContextMixin, View):
    """A paginated, highlighted, rate-limited search page over ``model`` (or ``queryset``).

    Attributes (each can be given to ``as_view()``):

    * ``model`` / ``queryset``: what is searched (``get_queryset()`` for
      per-request rows, e.g. only published ones).
    * ``models``: instead, several models (or QuerySets) searched as one, as
      ``semantic.search()`` does; semantic mode only, no filters.
    * ``field``: the EmbeddingField's name, when the model has several.
    * ``modes``: the modes offered, first the default: any of "semantic",
      "hybrid", "keyword".
    * ``filter_fields`` or ``filterset_class``: filters a visitor may add
      (django-filter), applied before the search ranks the rows.
    * ``paginate_by``, ``max_results``: results per page, and in all
      (SEMANTIC["VIEW_PAGINATE_BY"], ["VIEW_MAX_RESULTS"]).
    * ``collapse``, ``diversity``: semantic_search's options of those names
      (SEMANTIC["VIEW_COLLAPSE"], ["VIEW_DIVERSITY"]); ignored in keyword mode.
    * ``rate``: anonymous searches per address (SEMANTIC["SEARCH_RATE"],
      django-ratelimit's syntax); None turns the limit off.
    * ``text_fields``, ``text_config``: what hybrid and keyword modes rank
      by text (see SemanticQuerySet.hybrid_search), also the snippets'
      text search configuration.
    * ``snippet_options``: semantic.highlight.headline_options' arguments.

    Context: ``form``, ``query`` (cleaned, or ""), ``mode``, ``filter`` (the
    FilterSet or None), ``results`` (this page's rows, each with ``score``,
    ``best_chunk`` where the field is chunked, and ``snippet``, safe HTML;
    in keyword mode ``score`` is None and ``text_rank`` is set),
    ``page_obj``, ``paginator``, ``is_paginated``, ``previous_page_url`` and
    ``next_page_url`` (query strings, or ""), ``error`` (a message for the
    visitor, or "").
    """

    template_name = "semantic/search.html"
    model = None
    queryset = None
    models = None
    field = None
    modes = tuple(MODES)
    form_class = SemanticSearchForm
    filter_fields = None
    filterset_class = None
    paginate_by = FROM_SETTINGS
    max_results = FROM_SETTINGS
    collapse = FROM_SETTINGS
    diversity = FROM_SETTINGS
    rate = FROM_SETTINGS
    text_fields = None
    text_config = None
    snippet_options = {}
    page_kwarg = "page"

    def get(self, request, *args, **kwargs):
        modes = self.get_modes()
        form = self.form_class(request.GET, modes=modes)
        queryset = None if self.models else self.get_queryset()
        filterset = None if self.models else self.get_filterset(queryset)
        context = {"form": form, "query": "", "mode": modes[0], "filter": filterset, "results": [], "error": ""}
        if not form.has_query:
            return self.render(context)
        if not form.is_valid():
            context["error"] = " ".join(message for errors in form.errors.values() for message in errors)
            return self.render(context, status=400)
        context.update(query=form.cleaned_data["q"], mode=form.cleaned_data["mode"])
        if filterset is not None:
            if not filterset.is_valid():
                context["error"] = "Invalid filter: " + " ".join(
                    f"{name}: {message}" for name, errors in filterset.errors.items() for message in errors
                )
                return self.render(context, status=400)
            queryset = filterset.qs
        if self.is_rate_limited(request):
            context["error"] = "Too many searches from your address; wait a minute and try again."
            return self.render(context, status=429)
        try:
            results = self.search(queryset, context["query"], context["mode"])
        except ValueError as exc:
            context["error"] = str(exc)
            return self.render(context, status=400)
        context.update(self.paginate(results, request))
        attach_snippets(
            context["results"], context["query"], lambda row: getattr(row, "search_field", None) or self.embedding_field,
            using=queryset.db if queryset is not None else "default", config=self.text_config, **self.snippet_options,
        )
        return self.render(context)

    def render(self, context, status=200):
        return self.render_to_response(self.get_context_data(**context), status=status)

    # --- what is searched ---------------------------------------------------------

    def get_modes(self):
        if self.models:
            if self.filter_fields or self.filterset_class:
                raise ImproperlyConfigured(f"{type(self).__name__}: filters apply to one model; give querysets in models instead.")
            return ("semantic",)
        return self.modes

    def get_queryset(self):
        if self.queryset is not None:
            return self.queryset.all()
        if self.model is None:
            raise ImproperlyConfigured(f"{type(self).__name__} needs a model or a queryset.")
        return self.model._default_manager.all()

    @property
    def embedding_field(self):
        model = self.model or self.queryset.model
        return get_embedding_field(model, self.field)

    def get_filterset(self, queryset):
        """The visitor's filters as a django-filter FilterSet bound to the request, or None."""
        if self.filterset_class is None and not self.filter_fields:
            return None
        try:
            from django_filters.filterset import filterset_factory
        except ImportError as exc:
            raise ImproperlyConfigured("filter_fields and filterset_class need django-filter: pip install django-filter.") from exc
        filterset_class = self.filterset_class or filterset_factory(queryset.model, fields=self.filter_fields)
        return filterset_class(self.request.GET, queryset=queryset, request=self.request)

    # --- the search -------------------------------------------------------------------

    def setting(self, name, setting):
        value = getattr(self, name)
        return getattr(semantic_settings, setting) if value is FROM_SETTINGS else value

    def search(self, queryset, query, mode):
        """The ranked rows for ``query`` (at most max_results); ValueError for input the library refuses."""
        k = self.setting("max_results", "VIEW_MAX_RESULTS")
        if self.models:
            return search_across_models(query, models=self.models, k=k)
        if mode == "keyword":
            config = self.text_config or semantic_settings.HYBRID_TEXT_CONFIG
            document = text_search_document(self.embedding_field, self.text_fields, config)
            rows = list(text_ranking(queryset, document, SearchQuery(query, search_type="websearch", config=config))[:k])
            for row in rows:
                row.score, row.text_rank = None, row._text_rank
            return rows
        options = {"field": self.field, "k": k}
        collapse, diversity = self.setting("collapse", "VIEW_COLLAPSE"), self.setting("diversity", "VIEW_DIVERSITY")
        if collapse:
            options["collapse"] = collapse
        if diversity:
            options["diversity"] = diversity
        if mode == "hybrid":
            return list(queryset.hybrid_search(query, text_fields=self.text_fields, config=self.text_config, **options))
        return list(queryset.semantic_search(query, **options))

    def paginate(self, results, request):
        paginator = Paginator(results, self.setting("paginate_by", "VIEW_PAGINATE_BY"))
        # get_page: a page number out of range or not a number shows the
        # nearest page, not an error.
        page = paginator.get_page(request.GET.get(self.page_kwarg))
        return {
            "results": list(page.object_list),
            "page_obj": page,
            "paginator": paginator,
            "is_paginated": page.has_other_pages(),
            "previous_page_url": self.page_url(request, page.previous_page_number()) if page.has_previous() else "",
            "next_page_url": self.page_url(request, page.next_page_number()) if page.has_next() else "",
        }

    def page_url(self, request, number):
        """This search's query string with page ``number``: the query, mode and filters kept."""
        params = request.GET.copy()
        params[self.page_kwarg] = number
        return "?" + params.urlencode()

    def is_rate_limited(self, request):
        """Whether this anonymous visitor is over ``rate`` (counted here; signed-in users never are)."""
        label = "models" if self.models else (self.model or self.queryset.model)._meta.label_lower
        return over_search_rate(request, f"semantic.search:{label}", self.setting("rate", "SEARCH_RATE"))
