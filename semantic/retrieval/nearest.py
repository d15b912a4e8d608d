"""
Nearest-neighbour search as a lazy QuerySet: how it is built, and how it runs.

``build`` turns a QuerySet into a search (annotations ``distance`` and
``score``, ordered by distance, the vector column deferred). The rows are
compared by their own vector, or, for a chunked field, by their best chunk
(semantic.retrieval.chunks). ``run`` evaluates such a QuerySet under its index
settings (semantic.retrieval.session), chosen per query by the options
(semantic.retrieval.options) and, for the automatic choice, the planner's
estimate of what an exact scan would compare (semantic.retrieval.estimates).
"""

import functools

from django.core.exceptions import FieldError, ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import models
from django.db.models import F, FloatField, Q, Value
from django.db.models.sql.query import Query
from django.db.models.sql.where import AND

from semantic.conf import SETTING_NAME
from semantic.distances import get_metric, vector_literal
from semantic.retrieval.chunks import (
    CHUNKS_PER_RESULT,
    ChunkSearch,
    SearchColumn,
    add_best_chunk_columns,
    attach_best_chunks,
    best_column,
    row_filters,
)
from semantic.retrieval.estimates import planned_rows, scan_estimate, table_rows
from semantic.retrieval.query_vectors import as_query_vector
from semantic.retrieval.session import search_settings
from semantic.retrieval.sql import SearchQuery
from semantic.slots import Slot
from semantic.switching import live_slot

SEARCH_ANNOTATIONS = ("distance", "score", "best_chunk_id")
FLOAT = FloatField()


class SearchPlan:
    """What a search QuerySet carries through its clones besides its SQL."""

    def __init__(self, field, options):
        self.field = field
        self.options = options


class SearchShape:
    """What ``build`` added to the query, to tell later whether anything else was.

    ``unfiltered``: the search was built on every row of the table;
    ``where_size``: its WHERE's size then. While both hold, the table's
    statistics say how many rows an exact scan compares, and the compiled
    SQL can be reused (semantic.retrieval.sql). ``key`` names everything else
    the SQL depends on.
    """

    def __init__(self, key, unfiltered, where_size, annotations):
        self.key = key
        self.unfiltered = unfiltered
        self.where_size = where_size
        self.annotations = frozenset(annotations)


# Resolving expressions costs a few hundred microseconds on every search,
# about what PostgreSQL takes for a small index scan. What a search adds
# depends only on the model, the field and the metric (the query vector
# aside), and names only the base table's columns: it is resolved once and
# copied per search (a copy is relabelled, never changed in place).
RESOLVED_CACHE_SIZE = 256
_searchable_nodes = {}
_annotation_templates = {}


def add_searchable(query, slot):
    """Add the slot's searchable_q to ``query``'s WHERE, resolved once per slot while SEMANTIC stays the same.

    (The condition names the slot's fingerprint and the attempt limit, both
    from the settings; hashing the Q to key the cache cost as much as
    resolving it.)
    """
    key = slot.key
    node = _searchable_nodes.get(key)
    if node is None:
        probe = Query(slot.field.model)
        probe.add_q(slot.searchable_q())
        node = _remember(_searchable_nodes, key, probe.where)
    query.get_initial_alias()
    query.where.add(node.clone(), AND)


class _QueryVectorSlot(Value):
    """Where the query vector goes in a resolved annotation template."""


def add_search_annotations(query, slot, metric, by_chunk, literal):
    """Annotate ``distance`` and ``score`` (and ``best_chunk_id`` by chunk), as add_annotation would.

    The resolved expressions come from a template per slot, metric and
    kind; only the query vector's Value is new.
    """
    key = (slot.key, metric.name, by_chunk)
    template = _annotation_templates.get(key)
    if template is None:
        probe = Query(slot.field.model)
        if by_chunk:
            probe.add_annotation(best_column("id"), "best_chunk_id")
            distance = best_column("distance")
        else:
            distance = SearchColumn(metric.distance(slot.vector(), _QueryVectorSlot(None)), output_field=FLOAT)
        probe.add_annotation(distance, "distance")
        probe.add_annotation(SearchColumn(metric.score(F("distance")), output_field=FLOAT), "score")
        template = _remember(_annotation_templates, key, dict(probe.annotations))
    vector = Value(literal)
    for alias, expression in template.items():
        # Query.add_annotation(select=True), less the resolving.
        query.check_alias(alias)
        query.append_annotation_mask([alias])
        query.annotations[alias] = _with_vector(expression, vector)
        if query.selected:
            query.selected[alias] = alias


def _with_vector(expression, vector):
    """A copy of ``expression`` (a resolved template) with ``vector`` in its query-vector slot."""
    if isinstance(expression, _QueryVectorSlot):
        return vector
    sources = expression.get_source_expressions()
    if not sources:
        return expression  # leaves are shared, as Query.clone() shares annotations: never changed in place
    copy = expression.copy()
    # Expressions compare by ``identity``, made of their constructor's
    # arguments: the copy's would still name the template's slot.
    copy.__dict__["identity"] = (expression.identity, vector.identity)
    copy.set_source_expressions([None if source is None else _with_vector(source, vector) for source in sources])
    return copy


def _settings_changed(*, setting, **kwargs):
    if setting == SETTING_NAME:
        _searchable_nodes.clear()


setting_changed.connect(_settings_changed)


def _remember(cache, key, value):
    if len(cache) >= RESOLVED_CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def build(queryset, vector, slot, *, k, min_score, options):
    """``queryset`` searched by ``vector`` (see SemanticQuerySet.nearest for the contract).

    ``slot`` is the slot whose vectors are compared (semantic.slots), or a
    field: the slot its searches use now (semantic.switching.live_slot).
    """
    if queryset.query.is_sliced:
        raise TypeError("Cannot search a QuerySet once a slice has been taken; search first, then slice.")
    if not isinstance(slot, Slot):
        slot = live_slot(slot, queryset.db)
    field = slot.field
    metric = get_metric(field.metric)
    literal = vector_literal(as_query_vector(vector, slot))
    by_chunk = options.by_chunk if options.by_chunk is not None else slot.chunked
    if by_chunk and not slot.chunked:
        raise ImproperlyConfigured(f"{field.model.__name__}.{field.name} stores no chunks (chunks=False).")
    taken = set(SEARCH_ANNOTATIONS) & _field_names(field.model)
    if taken:
        raise FieldError(f"{field.model.__name__} has a field named {sorted(taken)[0]!r}, which searches annotate.")

    if _joins_to_many(queryset.query):
        queryset = _each_row_once(queryset)
    # One clone, changed in place: a search is built on every call, and each
    # QuerySet method would copy the query again.
    searched = queryset._chain()
    query = searched.query
    unfiltered = not query.where.children and len(query.alias_map) <= 1 and not query.annotations
    query.__class__ = SearchQuery
    query.search_literal = literal
    # Vectors made under another encoder configuration live in another
    # space: until the worker re-embeds them, they are left out.
    add_searchable(query, slot)
    if by_chunk:
        query.chunk_search = ChunkSearch(slot.chunk_model, metric, literal, table=slot.chunk_table)
    add_search_annotations(query, slot, metric, by_chunk, literal)
    max_distance = None
    if min_score is not None:
        max_distance = metric.max_distance(min_score)
        query.add_q(Q(distance__lte=max_distance))
    query.clear_ordering(force=True, clear_default=False)
    query.add_ordering("distance")
    if searched._fields is None:
        # Parsing vectors costs more than finding them: results leave the
        # column out unless asked for (.defer(None) loads everything).
        query.add_deferred_loading([field.name])
    if k is not None:
        query.set_limits(high=k)
    key = (slot.key, slot.fingerprint, by_chunk, max_distance)
    query.search_shape = SearchShape(key, unfiltered, len(query.where.children), query.annotations)
    searched._search_plan = SearchPlan(field, options)
    return searched


def _joins_to_many(query):
    """Whether ``query`` joins a to-many relation (a filter across a reverse foreign key or a many-to-many)."""
    return any(
        getattr(join.join_field, "one_to_many", False) or getattr(join.join_field, "many_to_many", False)
        for join in query.alias_map.values()
        if getattr(join, "join_field", None) is not None
    )


def _each_row_once(queryset):
    """``queryset``'s rows, each once: its filters as a primary-key subquery.

    A join to a to-many relation gives a row once per related row that
    matched, and a search would rank each copy (the same row twice in the
    top k). The subquery keeps the filters' meaning; what the QuerySet
    loads (only/defer, select_related) is kept, the rest of it is filters.
    """
    rows = type(queryset)(model=queryset.model, using=queryset.db).filter(pk__in=queryset.values("pk"))
    rows.query.deferred_loading = queryset.query.deferred_loading
    rows.query.select_related = queryset.query.select_related
    return rows


@functools.cache
def _field_names(model):
    return frozenset({f.name for f in model._meta.get_fields()} | {f.attname for f in model._meta.concrete_fields})


def index_settings(queryset):
    """The settings ``queryset`` (a search) runs under; may ask the planner (see SearchOptions)."""
    plan = queryset._search_plan
    query = queryset.query
    chunk_search = query.chunk_search

    def estimate_scan():
        model = plan.field.model
        if query.is_unfiltered():
            rows = table_rows(queryset.db, model)
        else:
            rows = planned_rows(queryset.db, row_filters(query))
        return scan_estimate(rows, queryset.db, model, chunk_search and chunk_search.table)

    limit = query.high_mark
    scan_rows = limit * CHUNKS_PER_RESULT if chunk_search is not None and limit is not None else limit
    return plan.options.index_settings(limit, estimate_scan, scan_rows)


def applied_settings(queryset):
    """A context manager running its block under ``queryset``'s index settings (semantic.retrieval.session)."""
    return search_settings(queryset.db, index_settings(queryset), keeps_locks=bool(queryset.query.select_for_update))


def run(queryset, action):
    """``action(queryset)`` under the search's index settings."""
    with applied_settings(queryset):
        return action(queryset)


def stream(queryset, iterate):
    """Yield ``iterate(queryset)``'s rows under the search's index settings."""
    with applied_settings(queryset):
        yield from iterate(queryset)


def fetch(queryset, fetch_all):
    """The rows of ``queryset`` (a search): ``fetch_all(runner)`` fills and returns the runner's result cache.

    Instances of a search by chunk come with ``best_chunk`` (fetched in the
    same statement). A bounded chunk scan that found fewer than k rows runs
    again unbounded (see semantic.retrieval.chunks).
    """
    chunk_search = queryset.query.chunk_search
    instances = queryset._iterable_class is models.query.ModelIterable
    runner = queryset._chain()
    if chunk_search is not None and instances:
        add_best_chunk_columns(runner.query)
    with applied_settings(runner):
        rows = fetch_all(runner)
        limit = runner.query.high_mark
        if chunk_search is not None and limit is not None and len(rows) < limit - runner.query.low_mark:
            runner = runner._chain()
            runner.query.chunk_search = chunk_search.without_bound()
            rows = fetch_all(runner)
    if chunk_search is None and queryset.query.order_by == ("distance",) and rows:
        # Relaxed-order iterative scans may return neighbours slightly out
        # of order; the rows are right, so sort them here.
        sort_by_distance(rows, queryset._fields)
    if chunk_search is not None and instances:
        attach_best_chunks(rows, chunk_search.chunk_model, runner.db)
    return rows, runner


def sort_by_distance(rows, fields):
    first = rows[0]
    if isinstance(first, models.Model):
        rows.sort(key=lambda row: row.distance)
    elif isinstance(first, dict) and "distance" in first:
        rows.sort(key=lambda row: row["distance"])
    elif isinstance(first, tuple) and "distance" in (fields or ()):
        position = fields.index("distance")
        rows.sort(key=lambda row: row[position])
    elif fields == ("distance",):
        rows.sort()
