"""
One search across several models: ``semantic.search("query", models=[Article, FAQ.objects.filter(...)])``.

Scores are comparable only between fields whose query vectors come from the
same encoder configuration and whose distance is the same metric. Such
fields form a group, searched in one SQL statement: each model's search is
a branch of a ``UNION ALL`` ordered by distance. Groups are fused by
reciprocal rank fusion, since their scores mean different things.
"""

from collections import defaultdict
from dataclasses import dataclass

from django.core.exceptions import EmptyResultSet
from django.db import connections
from django.db.models import Model, QuerySet

from semantic.conf import semantic_settings
from semantic.distances import get_metric
from semantic.fields import get_embedding_field
from semantic.retrieval.options import SearchOptions, check_k, clean_query
from semantic.retrieval.query_vectors import embed_query
from semantic.retrieval.session import search_settings
from semantic.switching import live_slot


@dataclass(frozen=True)
class Source:
    """One model's part of the search: its rows, the field they are ranked by, and that field's live slot."""

    queryset: QuerySet
    field: object
    slot: object

    @property
    def label(self):
        return self.queryset.model._meta.label

    @property
    def comparable_key(self):
        """Sources with equal keys have scores on one scale: same query vectors, same metric, same database."""
        return (self.slot.encoder.query_fingerprint, self.field.metric, self.queryset.db)


def resolve_sources(models):
    """``models`` (model classes, QuerySets, or (either, field name) pairs) as Sources; clear errors otherwise."""
    if isinstance(models, (type, QuerySet)) or not models:
        raise ValueError("models must be a non-empty list of models or QuerySets.")
    sources, seen = [], set()
    for entry in models:
        target, field_name = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
        if isinstance(target, QuerySet):
            queryset = target
        elif isinstance(target, type) and issubclass(target, Model):
            queryset = target._default_manager.all()
        else:
            raise ValueError(f"models holds {target!r}: a model class or a QuerySet was expected.")
        field = get_embedding_field(queryset.model, field_name)
        source = Source(queryset, field, live_slot(field, queryset.db))
        if (source.label, source.field.name) in seen:
            raise ValueError(f"{source.label}.{source.field.name} is named twice in models.")
        seen.add((source.label, source.field.name))
        sources.append(source)
    return sources


def search(query, models, *, k=20, min_score=None, **options):
    """The ``k`` rows of ``models`` nearest to ``query`` in meaning, best first, as model instances.

    ``models``: model classes (their default manager's rows), QuerySets (a
    per-model filter: ``Article.objects.filter(topic="tech")``), or
    ``(model_or_queryset, "field")`` for a model with several
    EmbeddingFields. Each instance carries ``distance`` and ``score`` (its
    own field's), ``best_chunk`` (a chunked field's best passage, or None)
    and ``search_score``: the score when every field shares one encoder
    configuration and metric, so the ranking is by score; otherwise the
    reciprocal rank fusion score of its rank within its group
    (SEMANTIC["HYBRID_RRF_K"]). ``min_score`` and the index ``options``
    (``exact``, ``ef_search``, …) apply to every model.

    Raises ValueError for a bad query, ``k`` or ``models`` (as
    semantic_search does), ImproperlyConfigured for a model without an
    EmbeddingField.
    """
    query = clean_query(query)
    check_k(k)
    search_options = SearchOptions.from_kwargs(**options)
    groups = defaultdict(list)
    for source in resolve_sources(models):
        groups[source.comparable_key].append(source)
    rankings = [_search_group(sources, query, k, min_score, search_options) for sources in groups.values()]
    if len(rankings) == 1:
        ranked = [(hit, hit.score) for hit in rankings[0]]
    else:
        ranked = _fuse(rankings)
    ranked.sort(key=lambda pair: -pair[1])
    return _instances(ranked[:k])


@dataclass
class Hit:
    source: Source
    pk: str
    distance: float
    best_chunk_id: int | None

    @property
    def score(self):
        return get_metric(self.source.field.metric).score_of(self.distance)


# One branch per model: its search's SQL as a derived table, the primary key
# as text (models' keys differ in type), the branch's number to tell the
# rows apart, and each row's position in its branch (ties in distance by
# primary key in its own type, as the model's own search orders them). Each
# branch keeps its own ORDER BY … LIMIT, so each can use its index; the
# outer ORDER BY merges them.
BRANCH_SQL = (
    "SELECT %s AS source, b.pk::text, b.distance, {chunk}, row_number() OVER (ORDER BY b.distance, b.pk) "
    "FROM ({sql}) AS b({columns})"
)


def _search_group(sources, query, k, min_score, options):
    """The top ``k`` Hits of sources whose scores are comparable, from one statement."""
    vector = embed_query(sources[0].slot, query)
    branches, params, settings = [], [], {}
    for number, source in enumerate(sources):
        searched = _searchable(source.queryset)._nearest(vector, source.slot, k, min_score, options)
        chunked = searched.query.chunk_search is not None
        if chunked:
            # Unbounded chunk scan: a bounded one can come back short, and
            # this statement has no second try (semantic.retrieval.chunks).
            searched.query.chunk_search = searched.query.chunk_search.without_bound()
        columns = ("pk", "distance", "best_chunk_id") if chunked else ("pk", "distance")
        try:
            sql, branch_params = searched.values(*columns).query.sql_with_params()
        except EmptyResultSet:  # e.g. .none(), or pk__in=[]
            continue
        branches.append(
            BRANCH_SQL.format(sql=sql, columns=", ".join(columns), chunk="b.best_chunk_id" if chunked else "NULL::integer")
        )
        params += [number, *branch_params]
        settings = _merge_settings(settings, searched.search_settings())
    if not branches:
        return []
    statement = " UNION ALL ".join(f"({branch})" for branch in branches) + " ORDER BY 3, 1, 5 LIMIT %s"
    using = sources[0].queryset.db
    with search_settings(using, settings), connections[using].cursor() as cursor:
        cursor.execute(statement, [*params, k])
        rows = cursor.fetchall()
    return [Hit(sources[number], pk, distance, chunk_id) for number, pk, distance, chunk_id, _ in rows]


def _searchable(queryset):
    from semantic.querysets import SemanticQuerySet

    if isinstance(queryset, SemanticQuerySet):
        return queryset
    return SemanticQuerySet(model=queryset.model, query=queryset.query.chain(), using=queryset.db)


def _merge_settings(merged, values):
    """Settings for a statement of several searches.

    Index settings (ef_search, iterative scans) are taken at their most
    thorough. "enable_indexscan off" (an exact scan) holds only when every
    branch asked for it: otherwise the index is offered to all, and a small
    branch is still scanned exactly when the planner costs that lower.
    """
    if not merged:
        return dict(values)
    exact = merged.get("enable_indexscan") == "off" and values.get("enable_indexscan") == "off"
    combined = {**merged, **values}
    for name in ("hnsw.ef_search", "ivfflat.probes"):
        if name in merged and name in values:
            combined[name] = max(int(merged[name]), int(values[name]))
    if not exact:
        combined.pop("enable_indexscan", None)
        combined.pop("enable_seqscan", None)
    return combined


def _fuse(rankings):
    """Reciprocal rank fusion of groups' rankings: (hit, 1 / (c + rank within its group))."""
    c = semantic_settings.HYBRID_RRF_K
    return [(hit, 1.0 / (c + rank)) for ranking in rankings for rank, hit in enumerate(ranking, start=1)]


def _instances(ranked):
    """Model instances for (Hit, search score) pairs, in order; rows deleted meanwhile are left out."""
    by_source = defaultdict(list)
    for hit, _ in ranked:
        by_source[hit.source].append(hit)
    rows, chunks = {}, {}
    for source, hits in by_source.items():
        found = source.queryset.filter(pk__in=[hit.pk for hit in hits]).order_by()
        rows.update({(source, str(row.pk)): row for row in found})
        chunk_ids = [hit.best_chunk_id for hit in hits if hit.best_chunk_id is not None]
        if chunk_ids:
            found_chunks = source.slot.chunks_by_id(chunk_ids, source.queryset.db)
            chunks.update({(source, pk): chunk for pk, chunk in found_chunks.items()})
    results = []
    for hit, search_score in ranked:
        row = rows.get((hit.source, hit.pk))
        if row is None:
            continue
        row.distance, row.score, row.search_score = hit.distance, hit.score, search_score
        row.best_chunk = chunks.get((hit.source, hit.best_chunk_id))
        row.search_field = hit.source.field
        results.append(row)
    return results
