"""
Django admin for models with an EmbeddingField.

::

    from django.contrib import admin
    from semantic import SemanticAdminMixin

    @admin.register(Article)
    class ArticleAdmin(SemanticAdminMixin, admin.ModelAdmin):
        list_display = ["title", "topic"]
        list_filter = ["topic"]
        search_fields = ["title", "body"]   # the keyword search, still one click away

The changelist's search box then ranks rows by meaning. The search runs in
``get_search_results``, so Django's ChangeList has already applied
``list_filter``, ``date_hierarchy`` and the other lookups of the query string
to the queryset it searches, and permissions, actions and pagination work as
on any changelist. What the mixin adds:

* a search mode next to the box (``?search_mode=``): *Auto* (the default
  mode, but keyword search for a term that looks like an id or a number, or
  is quoted), *Semantic*, *Hybrid* (``hybrid_search``) and *Keyword* (Django's
  own search over ``search_fields``), and a line under the box saying what
  the list shows, with a link to the other kind of search;
* a *Relevance* column while the list is ranked, and the ranking as the
  list's order (a click on a column header sorts by that column first);
* an *Embedding status* column and list filter, by semantic.status (a
  failed row shows its error when hovered);
* the actions *Re-embed selected* (mark stale and wake a worker now; also
  retries failed rows) and *Mark selected stale* (the next wake-up or the
  periodic sweep embeds them);
* vectors shown read-only and short ("384 dims: [0.012, -0.034, …]"), never
  as form inputs: an EmbeddingField named in ``list_display``,
  ``readonly_fields``, ``fields`` or ``fieldsets`` is shown that way too.

When semantic search cannot run (reranker or field misconfigured, the model
fails to load, no row of the filtered list has a vector yet) the list falls
back to the keyword search and says why, instead of failing.
"""

import logging
import re
from dataclasses import dataclass

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import (
    IS_FACETS_VAR,
    IS_POPUP_VAR,
    ORDER_VAR,
    PAGE_VAR,
    SEARCH_VAR,
    ChangeList,
)
from django.core.exceptions import ImproperlyConfigured
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from semantic import status, switching
from semantic.fields import EmbeddingField, embedding_fields, get_embedding_field

logger = logging.getLogger("semantic")

SEARCH_MODE_VAR = "search_mode"
AUTO, SEMANTIC, HYBRID, KEYWORD = "auto", "semantic", "hybrid", "keyword"
MODE_LABELS = {AUTO: "Auto", SEMANTIC: "Semantic", HYBRID: "Hybrid", KEYWORD: "Keyword"}

# Terms the Auto mode hands to the keyword search: ids and numbers ("1234",
# "#1234", "12.5", "2005-03-01"), UUIDs, and quoted phrases.
_NUMBER = re.compile(r"#?[\d][\d\s.,:/-]*")
_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.IGNORECASE)
_QUOTED = re.compile(r"""(["']).+\1""", re.DOTALL)

# Where get_search_results leaves what it did, for the ChangeList and its template.
_REQUEST_ATTR = "_semantic_admin_search"


def keyword_reason(term):
    """Why the Auto mode should search ``term`` by keyword, or None to search by meaning."""
    term = term.strip()
    if _NUMBER.fullmatch(term) or _UUID.fullmatch(term):
        return "looks like an id or a number"
    if _QUOTED.fullmatch(term):
        return "is quoted"
    return None


# --- embedding status ----------------------------------------------------------


class EmbeddingStatusFilter(admin.SimpleListFilter):
    """List filter by embedding status (semantic.status: fresh, stale, missing, other model, failed, no text).

    ``SemanticAdminMixin`` adds one per EmbeddingField; for a list_filter of
    your own use ``EmbeddingStatusFilter.for_field("embedding")``.
    """

    title = "embedding status"
    parameter_name = "embedding_status"
    field_name = None

    @classmethod
    def for_field(cls, field_name, title=None):
        """A filter class for the EmbeddingField ``field_name``."""
        return type(
            f"{field_name.title().replace('_', '')}StatusFilter",
            (cls,),
            {
                "field_name": field_name,
                "parameter_name": f"{field_name}_status",
                "title": title or f"{field_name.replace('_', ' ')} status",
            },
        )

    def lookups(self, request, model_admin):
        return [(state, status.LABELS[state]) for state in status.STATES]

    def queryset(self, request, queryset):
        if self.value() not in status.STATES:
            return None
        return queryset.filter(status.status_q(get_embedding_field(queryset.model, self.field_name), self.value()))


def status_html(field, obj, with_name=False):
    """``obj``'s embedding status as a labelled span; a failed row's error in its title."""
    state = status.embedding_status(field, obj)
    title = status.DESCRIPTIONS[state]
    if state == status.FAILED:
        attempts, error = status.failure(field, obj)
        title = f"{title} {attempts} attempt(s): {error}"
    return format_html(
        '<span class="semantic-status semantic-status-{}" title="{}">{}{}</span>',
        state,
        title,
        f"{field.name}: " if with_name else "",
        status.LABELS[state],
    )


def format_vector(vector, values=4):
    """A short text for a vector: '384 dims: [0.012, -0.034, 0.051, 0.002, …]'."""
    if vector is None:
        return None
    shown = ", ".join(f"{float(v):.3f}" for v in vector[:values])
    return f"{len(vector)} dims: [{shown}{', …' if len(vector) > values else ''}]"


# --- search --------------------------------------------------------------------


@dataclass
class AdminSearch:
    """What the changelist search did with a term."""

    term: str
    requested: str  # the mode asked for: AUTO, SEMANTIC, HYBRID or KEYWORD
    mode: str  # the mode used: SEMANTIC, HYBRID or KEYWORD
    rerank: bool = False
    reason: str = ""  # why KEYWORD was used although not asked for
    limit: int = 0

    @property
    def ranked(self):
        return self.mode != KEYWORD

    def fall_back(self, reason):
        self.mode, self.rerank, self.reason = KEYWORD, False, reason


class SemanticChangeList(ChangeList):
    """The changelist of a SemanticAdminMixin admin.

    Keeps ``search_mode`` out of the filter lookups, orders a ranked search
    by relevance whatever the model's default ordering (Django 5.2 orders
    before ``get_search_results``, older versions after; both are covered),
    and adds the Relevance column while the list is ranked.
    """

    search_var = SEARCH_VAR
    search_mode_var = SEARCH_MODE_VAR
    is_popup_var = IS_POPUP_VAR
    is_facets_var = IS_FACETS_VAR

    def __init__(self, request, *args, **kwargs):
        self.semantic_search = None
        super().__init__(request, *args, **kwargs)
        self.semantic_search = _search_of(request)
        if self.semantic_search is not None and self.semantic_search.ranked:
            self.list_display = [*self.list_display, "semantic_relevance"]

    def get_filters_params(self, params=None):
        lookup_params = super().get_filters_params(params)
        lookup_params.pop(SEARCH_MODE_VAR, None)
        return lookup_params

    def get_queryset(self, request, exclude_parameters=None):
        queryset = super().get_queryset(request, exclude_parameters)
        search = _search_of(request)
        if search is not None and search.ranked:
            queryset = queryset.order_by(*self.get_ordering(request, queryset))
        return queryset

    def get_ordering(self, request, queryset):
        search = _search_of(request)
        if search is not None and search.ranked and not self.params.get(ORDER_VAR):
            # The search's own order (relevance, then its rank), not the
            # model's default ordering in front of it.
            return self._get_deterministic_ordering(queryset.query.order_by)
        return super().get_ordering(request, queryset)

    def get_ordering_field_columns(self):
        if self.semantic_search is not None and self.semantic_search.ranked and not self.params.get(ORDER_VAR):
            return {}  # no column header claims the order
        return super().get_ordering_field_columns()

    # --- for the template ----------------------------------------------------

    @property
    def semantic_search_available(self):
        return self.model_admin.semantic_search_available()

    @property
    def semantic_mode_choices(self):
        requested = self.params.get(SEARCH_MODE_VAR) or AUTO
        return [
            (mode, MODE_LABELS[mode], mode == requested)
            for mode in self.model_admin.get_search_modes(self.search_fields)
        ]

    @property
    def semantic_switch_note(self):
        """One line above the list while the searched field is switched to another model (semantic.switching): how far the fill is."""
        try:
            field = get_embedding_field(self.model, self.model_admin.semantic_search_field)
        except ImproperlyConfigured:
            return ""
        using = self.queryset.db
        upcoming, live = switching.switch_slots(field, using)
        if upcoming is None:
            return ""
        counts = upcoming.count_statuses(using)
        share = counts[status.FRESH] / counts["with_text"] if counts["with_text"] else 1.0
        return format_html(
            "Switching {} to model {}: {} of {} rows with text embedded ({}), {} pending. Searches use {}{}.",
            field.name,
            repr(upcoming.alias),
            f"{counts[status.FRESH]:,}",
            f"{counts['with_text']:,}",
            f"{share:.0%}",
            f"{counts['pending']:,}",
            repr(live.alias),
            " (promoted; semantic_promote --rollback undoes it)" if live.is_next else " until semantic_promote",
        )

    @property
    def semantic_note(self):
        """One line under the search box: what the list shows, and the other kind of search."""
        search = self.semantic_search
        if search is None or not search.term.strip():
            return ""
        if search.ranked:
            if search.mode == HYBRID:
                text = "Ranked by meaning and keywords together (hybrid search): the {} best rows at most."
            elif search.rerank:
                text = "Ranked by meaning, reranked by a cross-encoder: the {} best rows at most."
            else:
                text = "Ranked by meaning: the {} closest rows at most, most relevant first."
            text = format_html(text, search.limit)
            switch = (KEYWORD, "Search by keyword instead") if self.search_fields else None
        else:
            if search.reason:
                text = format_html("Keyword search: the term {}.", search.reason)
            else:
                text = format_html("Keyword search in {}.", ", ".join(f.lstrip("^=@") for f in self.search_fields))
            switch = (SEMANTIC, "Search by meaning instead") if self.semantic_search_available else None
        if switch is None:
            return text
        url = self.get_query_string({SEARCH_MODE_VAR: switch[0]}, [PAGE_VAR])
        return format_html('{} <a href="{}" id="semantic-search-switch">{}</a>', text, url, switch[1])


def _search_of(request):
    return getattr(request, _REQUEST_ATTR, None)


def _is_autocomplete(request):
    return getattr(request.resolver_match, "url_name", "") == "autocomplete"


class SemanticAdminMixin:
    """ModelAdmin mixin: semantic changelist search, embedding status, safe vectors.

    Put it before ``admin.ModelAdmin``. The model's default manager must be a
    SemanticManager. Attributes:

    * ``semantic_search_field``: the EmbeddingField to search (default: the
      model's only one);
    * ``semantic_search_limit`` (100): a ranked search lists at most this
      many rows, best first. Every row with a vector has *some* distance to
      the query, so without a limit a search would list the whole table;
      beyond the first hundred or so, relevance is noise. Filters apply
      before the limit: a filtered search still lists up to this many rows
      that pass the filter;
    * ``semantic_search_default_mode``: what Auto means, SEMANTIC (default)
      or HYBRID;
    * ``semantic_search_modes``: the modes offered next to the search box
      (KEYWORD is offered only with ``search_fields``);
    * ``semantic_search_rerank``: rerank semantic results with the
      cross-encoder; None (default) does so when ``SEMANTIC["RERANKER"]`` is
      set;
    * ``semantic_search_text_fields``: the text fields of hybrid search
      (default: the EmbeddingField's source fields);
    * ``semantic_query_max_length`` (1000): longer terms are cut before they
      are embedded (the model reads a few hundred tokens anyway);
    * ``semantic_status_column`` / ``semantic_status_filter`` (True): add the
      Embedding status column / list filter.

    The changelist template is ``semantic/admin/change_list.html``; to
    customise it, extend that template rather than ``admin/change_list.html``.
    """

    semantic_search_field = None
    semantic_search_limit = 100
    semantic_search_default_mode = SEMANTIC
    semantic_search_modes = (AUTO, SEMANTIC, HYBRID, KEYWORD)
    semantic_search_rerank = None
    semantic_search_text_fields = None
    semantic_query_max_length = 1000
    semantic_status_column = True
    semantic_status_filter = True

    change_list_template = "semantic/admin/change_list.html"

    # --- changelist ----------------------------------------------------------

    def get_changelist(self, request, **kwargs):
        return SemanticChangeList

    def get_list_display(self, request):
        list_display = _vectors_shown_short(self.model, super().get_list_display(request))
        if self.semantic_status_column and "semantic_status" not in list_display:
            list_display.append("semantic_status")
        return list_display

    def get_list_filter(self, request):
        list_filter = list(super().get_list_filter(request))
        if self.semantic_status_filter:
            fields = embedding_fields(self.model)
            present = {
                getattr(f, "field_name", None) or (fields[0].name if len(fields) == 1 else None)
                for f in list_filter
                if isinstance(f, type) and issubclass(f, EmbeddingStatusFilter)
            }
            for field in fields:
                if field.name not in present:
                    list_filter.append(EmbeddingStatusFilter.for_field(field.name, f"{field.verbose_name} status"))
        return list_filter

    def get_search_modes(self, search_fields=None):
        """The modes offered next to the search box."""
        if search_fields is None:
            search_fields = self.search_fields
        return [m for m in self.semantic_search_modes if m != KEYWORD or search_fields]

    def semantic_search_available(self):
        """Whether this list can be searched by meaning (its manager and field are usable)."""
        try:
            get_embedding_field(self.model, self.semantic_search_field)
        except ImproperlyConfigured:
            return False
        return hasattr(self.model._default_manager.none(), "semantic_search")

    def get_search_results(self, request, queryset, search_term):
        search = self.get_admin_search(request, queryset, search_term)
        setattr(request, _REQUEST_ATTR, search)
        if search.ranked:
            try:
                results = self.get_ranked_results(request, queryset, search)
            except (ImproperlyConfigured, ValueError, RuntimeError, OSError) as exc:
                if not isinstance(exc, ImproperlyConfigured):
                    logger.warning("semantic: admin search fell back to keywords", exc_info=True)
                search.fall_back(f"could not be searched by meaning ({exc})")
                self._message_once(request, messages.WARNING, f"Semantic search failed, keyword search used: {exc}")
            else:
                if results is not None:
                    return results, False
                search.fall_back("could not be ranked: no row of this list has an embedding yet")
                self._message_once(
                    request, messages.WARNING, "No row of this list has an embedding yet: keyword search used."
                )
        return super().get_search_results(request, queryset, search_term)

    def get_admin_search(self, request, queryset, search_term):
        """Decide how to search ``search_term``: an AdminSearch, not run yet."""
        requested = request.GET.get(SEARCH_MODE_VAR) or AUTO
        if requested not in self.get_search_modes(self.get_search_fields(request)):
            requested = AUTO
        mode = self.semantic_search_default_mode if requested == AUTO else requested
        search = AdminSearch(term=search_term, requested=requested, mode=mode, limit=self.semantic_search_limit)
        if not search_term.strip():
            search.mode = KEYWORD  # nothing to search: Django lists every row
        elif requested == KEYWORD:
            pass
        elif not hasattr(queryset, "semantic_search") or _is_autocomplete(request):
            # Not a SemanticQuerySet, or autocomplete's type-ahead (prefixes want keywords).
            search.mode = KEYWORD
        elif requested == AUTO and keyword_reason(search_term):
            search.fall_back(keyword_reason(search_term))
        if search.mode == SEMANTIC:
            search.rerank = self.semantic_search_rerank
            if search.rerank is None:
                from semantic.rerank import is_reranking_configured

                search.rerank = is_reranking_configured()
        return search

    def get_ranked_results(self, request, queryset, search):
        """The ranked queryset for ``search``, or None when no row could be ranked.

        The result is pinned to at most ``semantic_search_limit`` primary keys
        with the scores annotated (``distance``, ``score``, and
        ``hybrid_score`` or ``rerank_score``), so Django's ChangeList can
        count, order and paginate it like any queryset.
        """
        term = search.term.strip()[: self.semantic_query_max_length]
        field = get_embedding_field(self.model, self.semantic_search_field).name
        limit = self.semantic_search_limit
        if search.mode == HYBRID:
            return queryset.hybrid_search(term, field=field, k=limit, text_fields=self.semantic_search_text_fields)
        if search.rerank:
            results = queryset.semantic_search(term, field=field, k=limit, rerank=True, candidates=limit)
            return None if results.query.is_empty() else results
        rows = queryset.semantic_search(term, field=field, k=limit).values("pk", "distance", "score")
        ranked = [(row["pk"], {"distance": row["distance"], "score": row["score"]}) for row in rows]
        return queryset.pinned(ranked, "distance") if ranked else None

    def _message_once(self, request, level, message):
        # Facet counts run the search again; say it once.
        said = request.__dict__.setdefault("_semantic_admin_messages", set())
        if message not in said:
            said.add(message)
            self.message_user(request, message, level, fail_silently=True)

    @admin.display(description="Relevance")
    def semantic_relevance(self, obj):
        """The ranking's score: rerank score, hybrid score, or similarity (higher is closer)."""
        for name, label, digits in (
            ("rerank_score", "cross-encoder score", 3),
            ("hybrid_score", "hybrid score", 4),
            ("score", "similarity", 3),
        ):
            value = getattr(obj, name, None)
            if value is not None:
                details = f"{label}; similarity {obj.score:.3f}" if getattr(obj, "score", None) is not None else label
                return format_html('<span title="{}">{}</span>', details, f"{value:.{digits}f}")
        return None

    @admin.display(description="Embedding status")
    def semantic_status(self, obj):
        fields = embedding_fields(self.model)
        return format_html_join(", ", "{}", ((status_html(field, obj, len(fields) > 1),) for field in fields))

    # --- actions ---------------------------------------------------------------

    def get_actions(self, request):
        actions = super().get_actions(request)
        if self.actions is None or IS_POPUP_VAR in request.GET or not self.has_change_permission(request):
            return actions
        for name in ("semantic_reembed", "semantic_mark_stale"):
            if name not in actions:
                actions[name] = self.get_action(name)
        return actions

    # permissions=: Django checks them however the action is offered (a
    # subclass may list it in ``actions``), not only in get_actions above.
    @admin.action(description="Re-embed selected %(verbose_name_plural)s", permissions=["change"])
    def semantic_reembed(self, request, queryset):
        # Failed rows are retried too.
        rows = queryset.mark_stale()
        self.message_user(request, f"{rows} row(s) marked stale; a worker is re-embedding them.", messages.SUCCESS)

    @admin.action(description="Mark selected %(verbose_name_plural)s stale", permissions=["change"])
    def semantic_mark_stale(self, request, queryset):
        rows = queryset.mark_stale(wake=False)
        self.message_user(
            request,
            f"{rows} row(s) marked stale; the next wake-up of a worker (a save, or the periodic sweep) re-embeds them.",
            messages.SUCCESS,
        )

    # --- change form: vectors are shown, never edited ----------------------

    def get_readonly_fields(self, request, obj=None):
        readonly = _vectors_shown_short(self.model, super().get_readonly_fields(request, obj))
        # On the add page only where a declared layout names a vector.
        declared = flatten_fieldsets(self.fieldsets) if self.fieldsets else (self.fields or ())
        wanted = obj is not None or "semantic_vector" in _vectors_shown_short(self.model, declared)
        if wanted and "semantic_vector" not in readonly:
            readonly.append("semantic_vector")
        return readonly

    def get_fields(self, request, obj=None):
        return _vectors_shown_short(self.model, super().get_fields(request, obj))

    def get_fieldsets(self, request, obj=None):
        return [
            (name, {**options, "fields": _vectors_shown_short(self.model, options.get("fields", ()))})
            for name, options in super().get_fieldsets(request, obj)
        ]

    @admin.display(description="Embedding")
    def semantic_vector(self, obj):
        """Each embedding field's vector, short, with its status."""
        fields = embedding_fields(self.model)
        return format_html_join(
            mark_safe("<br>"),
            "{}{} ({})",
            (
                (
                    f"{field.name}: " if len(fields) > 1 else "",
                    format_vector(getattr(obj, field.attname)) or "no vector",
                    status_html(field, obj),
                )
                for field in fields
            ),
        )


def _vectors_shown_short(model, names):
    """``names`` with each EmbeddingField replaced by the short read-only display.

    Django renders a model field in a list or a read-only form row with
    ``display_for_field``, which fails on a numpy vector (and would print
    hundreds of numbers if it did not); nested tuples (a fieldset row) are kept.
    """
    vectors = {f.name for f in model._meta.get_fields() if isinstance(f, EmbeddingField)}
    result = []
    for name in names:
        if isinstance(name, (list, tuple)):
            name = type(name)(_vectors_shown_short(model, name))
        elif isinstance(name, str) and name in vectors:
            name = "semantic_vector"
        if name not in result:
            result.append(name)
    return result
