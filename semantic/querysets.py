"""
SemanticQuerySet: similarity search that composes with the ORM.

::

    Article.objects.filter(topic="tech").semantic_search("new phones")[:10]
    Article.objects.semantic_search("new phones").filter(score__gte=0.3)[:10]

``semantic_search`` returns an ordinary, unsliced QuerySet ordered by
distance, with ``distance`` and ``score`` annotated, so any filter can be
added before or after; slice it (or pass ``k``) to take the top results.
"""

import json
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, models, transaction
from django.db.models import Case, FloatField, IntegerField, Value, When
from django.db.models.query import ModelIterable

from semantic import cache as embedding_cache
from semantic.conf import semantic_settings
from semantic.distances import get_metric, query_value
from semantic.fields import embedding_fields, get_embedding_field, is_column
from semantic.hashing import clean_text
from semantic.status import searchable_q, stale_marks
from semantic.wakeups import schedule_embedding


class SemanticQuerySet(models.QuerySet):
    """QuerySet with semantic search, and bulk writes that keep vectors fresh.

    Django sends no signal for ``bulk_create``, ``bulk_update`` and
    ``update``; these overrides keep each row's source hash true (the new
    text's hash where every column of the text is written with it, a stale
    mark otherwise, see semantic.status) and wake a worker, so every way of
    changing a row through the ORM ends with a fresh vector. (Raw SQL is
    caught by the periodic rehash sweep.)
    """

    def bulk_create(self, objs, *args, **kwargs):
        objs = list(objs)
        fields = embedding_fields(self.model)
        update_fields = kwargs.get("update_fields")
        partly_written = []
        if kwargs.get("update_conflicts") and update_fields:
            # An upsert rewrites only update_fields of existing rows. With
            # every column of the text among them, the hash computed for the
            # insert is right for the update too; otherwise it is not, and
            # the rows are marked instead.
            for field in fields:
                if field.text_written_by(update_fields):
                    update_fields = [*update_fields, field.source_hash_attname]
                elif field.touched_by(update_fields):
                    partly_written.append(field)
            kwargs["update_fields"] = list(dict.fromkeys(update_fields))
        created = super().bulk_create(objs, *args, **kwargs)
        self._mark(partly_written, [obj.pk for obj in created if obj.pk is not None])
        self._wake(fields)
        return created

    def bulk_update(self, objs, fields, batch_size=None):
        objs = list(objs)
        touched = [f for f in embedding_fields(self.model) if f.touched_by(fields)]
        whole = [f for f in touched if f.text_written_by(fields)]
        hashes = []
        for field in whole:
            # The text's hash goes in the same statement as the text.
            for obj in objs:
                setattr(obj, field.source_hash_attname, field.compute_source_hash(obj))
            hashes.append(field.source_hash_attname)
        rows = super().bulk_update(objs, list(dict.fromkeys([*fields, *hashes])), batch_size=batch_size)
        self._mark([f for f in touched if f not in whole], [obj.pk for obj in objs])
        self._wake(touched)
        return rows

    def update(self, **kwargs):
        touched = [f for f in embedding_fields(self.model) if f.touched_by(kwargs)]
        # The new text is only known row by row: the worker reads it.
        kwargs = {**stale_marks(touched), **kwargs}
        rows = super().update(**kwargs)
        if rows:
            self._wake(touched)
        return rows

    update.alters_data = True

    def mark_stale(self, field=None, *, wake=True):
        """Mark the rows pending, so a worker re-embeds them; returns the row count.

        Also retries failed rows. A row whose text and model are unchanged
        keeps its vector: the worker only confirms it. ``wake=False`` leaves
        the rows for the next wake-up or the periodic sweep.
        """
        fields = embedding_fields(self.model) if field is None else [get_embedding_field(self.model, field)]
        rows = super().update(**stale_marks(fields))
        if rows and wake:
            self._wake(fields)
        return rows

    mark_stale.alters_data = True

    def _mark(self, fields, pks):
        if fields and pks:
            self.model._base_manager.using(self.db).filter(pk__in=pks).update(**stale_marks(fields))

    def _wake(self, fields):
        for field in fields:
            schedule_embedding(self.model, field.name, using=self.db)

    # --- read path ------------------------------------------------------------

    def semantic_search(
        self,
        query,
        *,
        field=None,
        k=None,
        min_score=None,
        exact=None,
        ef_search=None,
        probes=None,
        iterative_scan=None,
        by_chunk=None,
        rerank=False,
        candidates=None,
    ):
        """Rows ordered by distance to the embedding of ``query``.

        Annotates ``distance`` and ``score`` (similarity, higher is closer;
        see semantic.distances for each metric). Rows without a vector, and
        rows whose vector was made under another encoder configuration (model,
        prefix, normalisation, chunking) until the worker re-embeds them, are
        left out. The result is an ordinary lazy QuerySet: filter it before
        or after, slice it, or pass ``k``. ``min_score`` keeps rows at least
        that similar.

        Index use (see ``nearest``): ``exact`` True scans exactly, False uses
        the vector index, None (default) chooses per query. ``ef_search``,
        ``probes`` and ``iterative_scan`` tune the index for this query only.

        ``rerank=True`` takes ``candidates`` rows (default
        SEMANTIC["RERANK_CANDIDATES"]) from the vector search, scores each
        (query, text) pair with the configured cross-encoder and returns the
        top ``k`` (default 10) ordered by ``rerank_score``, with ``distance``
        and ``score`` still annotated. That evaluates the candidates at once;
        the returned QuerySet holds just those rows.

        Raises ValueError for an empty query or a ``k`` below 1.
        """
        _check_query(query)
        _check_k(k)
        embedding_field = get_embedding_field(self.model, field)
        vector = embed_query(embedding_field, query)
        if rerank:
            return self._reranked(
                query,
                embedding_field,
                vector,
                k=k or 10,
                candidates=candidates,
                min_score=min_score,
                options={
                    "exact": exact,
                    "ef_search": ef_search,
                    "probes": probes,
                    "iterative_scan": iterative_scan,
                    "by_chunk": by_chunk,
                },
            )
        return self.nearest(
            vector,
            field=embedding_field.name,
            k=k,
            min_score=min_score,
            exact=exact,
            ef_search=ef_search,
            probes=probes,
            iterative_scan=iterative_scan,
            by_chunk=by_chunk,
        )

    def nearest(
        self,
        vector,
        *,
        field=None,
        k=None,
        min_score=None,
        exact=None,
        ef_search=None,
        probes=None,
        iterative_scan=None,
        by_chunk=None,
    ):
        """Like semantic_search, for a query vector already computed.

        How the rows are found, applied with ``SET LOCAL`` inside the query's
        own transaction (a savepoint rolled back afterwards when the caller
        is already in one), so nothing leaks to other queries:

        * ``exact=True`` disables index scans: every row that passes the
          filters is compared, so the top k are exact.
        * ``exact=False`` uses the HNSW/IVFFlat index (sequential scans off)
          with iterative scans (pgvector >= 0.8), so a filtered search still
          returns k rows.
        * ``exact=None`` (default) is exact when the filters leave at most
          SEMANTIC["EXACT_SEARCH_THRESHOLD"] rows by the planner's estimate,
          when the search is not sliced, or when k exceeds what an index scan
          can return (1000); otherwise it uses the index.

        ``ef_search`` (HNSW, default SEMANTIC["EF_SEARCH"] or pgvector's 40,
        raised to k when k is larger), ``probes`` (IVFFlat) and
        ``iterative_scan`` ("relaxed_order", "strict_order", "off") override
        the settings for this query.

        A field with ``chunks=True`` ranks each row by its best-matching
        chunk (``by_chunk``, default True for such fields): ``distance`` is
        that chunk's, ``best_chunk_id`` names it, and fetched rows carry it as
        ``row.best_chunk`` (with ``text``, ``start``, ``end``). Each row comes
        once. ``by_chunk=False`` ranks by the row's own vector (the mean of
        its chunks).
        """
        _check_k(k)
        if iterative_scan is not None and iterative_scan not in ITERATIVE_SCAN_MODES:
            raise ValueError(f"iterative_scan must be one of {', '.join(ITERATIVE_SCAN_MODES)}, not {iterative_scan!r}.")
        embedding_field = get_embedding_field(self.model, field)
        metric = get_metric(embedding_field.metric)
        vector = query_value(_as_query_vector(vector, embedding_field))
        plan = SearchPlan(exact=exact, ef_search=ef_search, probes=probes, iterative_scan=iterative_scan)
        if by_chunk is None:
            by_chunk = embedding_field.chunk_model is not None
        if by_chunk and embedding_field.chunk_model is None:
            raise ImproperlyConfigured(f"{self.model.__name__}.{embedding_field.name} stores no chunks (chunks=False).")
        # Vectors made under another encoder configuration live in another
        # space: until the worker re-embeds them, they are left out.
        searchable = searchable_q(embedding_field)
        if by_chunk:
            # Each row scores as its best chunk; the chunk is kept as best_chunk.
            plan.chunk_model = embedding_field.chunk_model
            plan.chunk_distance = metric.distance("embedding", vector)
            best = (
                plan.chunk_model._base_manager.filter(owner=models.OuterRef("pk"))
                .annotate(_distance=plan.chunk_distance)
                .order_by("_distance", "index")
            )
            queryset = self.filter(searchable).annotate(
                distance=models.Subquery(best.values("_distance")[:1], output_field=FloatField()),
                best_chunk_id=models.Subquery(best.values("pk")[:1]),
            ).filter(distance__isnull=False)
            if min_score is not None:
                plan.max_distance = metric.max_distance(min_score)
        else:
            queryset = self.filter(searchable).annotate(
                distance=metric.distance(embedding_field.name, vector)
            )
            if min_score is not None:
                queryset = queryset.filter(distance__lte=metric.max_distance(min_score))
        queryset = queryset.annotate(score=metric.score("distance")).order_by("distance")
        if queryset._fields is None:
            # Parsing vectors costs more than finding them: results leave the
            # column out unless asked for (.defer(None) loads everything).
            queryset = queryset.defer(embedding_field.name)
        queryset._search_plan = plan
        return queryset[:k] if k is not None else queryset

    def similar_to(self, obj, *, field=None, k=None, min_score=None, **options):
        """Rows nearest to ``obj``'s stored vector, ``obj`` itself left out.

        ``obj`` is an instance or a primary key. Raises ValueError when it has
        no vector yet (its text is empty, or the worker has not embedded it).
        Accepts the index options of ``nearest``.
        """
        embedding_field = get_embedding_field(self.model, field)
        pk = obj.pk if isinstance(obj, models.Model) else obj
        vector = (
            self.model._base_manager.using(self.db)
            .filter(searchable_q(embedding_field), pk=pk)
            .values_list(embedding_field.attname, flat=True)
            .first()
        )
        if vector is None:
            raise ValueError(
                f"{self.model.__name__} {pk!r} has no searchable {embedding_field.name} vector "
                f"(it does not exist, its text is empty, or it is waiting for the worker)."
            )
        # Whole row against whole rows: the row vector is what "similar" means here.
        options.setdefault("by_chunk", False)
        return self.exclude(pk=pk).nearest(vector, field=embedding_field.name, k=k, min_score=min_score, **options)

    def hybrid_search(
        self,
        query,
        *,
        field=None,
        k=10,
        text_fields=None,
        weights=(1.0, 1.0),
        candidates=None,
        config=None,
        **options,
    ):
        """Rows ranked by reciprocal rank fusion of vector and full-text search.

        Two rankings of the filtered rows, fused in one SQL query: the
        ``candidates`` nearest by vector (default
        SEMANTIC["HYBRID_CANDIDATES"]) and the ``candidates`` best by
        PostgreSQL full-text rank (``ts_rank_cd`` of ``websearch_to_tsquery``
        over ``text_fields``, default the field's source fields that are
        columns, with text search configuration ``config``, default
        SEMANTIC["HYBRID_TEXT_CONFIG"]). Each row scores
        ``w_vector / (c + vector_rank) + w_text / (c + text_rank)`` with
        c = SEMANTIC["HYBRID_RRF_K"] (a ranking a row is missing from adds
        nothing). Returns the top ``k`` ordered by ``hybrid_score``, annotated
        with ``hybrid_score``, ``vector_rank``, ``text_rank`` (None when
        absent), ``distance`` and ``score``. Evaluates the search at once.

        For large tables give the text a GIN index (an expression index on
        the same ``to_tsvector``, or a SearchVectorField passed as
        ``text_fields``), or the text ranking scans every filtered row.
        """
        from django.contrib.postgres.search import SearchQuery, SearchRank

        _check_query(query)
        _check_k(k)
        embedding_field = get_embedding_field(self.model, field)
        vector_weight, text_weight = (float(w) for w in weights)
        candidates = max(int(candidates or semantic_settings.HYBRID_CANDIDATES), k)
        config = config or semantic_settings.HYBRID_TEXT_CONFIG
        document = text_search_document(embedding_field, text_fields, config)
        search_query = SearchQuery(query, search_type="websearch", config=config)

        by_vector = self.nearest(embed_query(embedding_field, query), field=embedding_field.name, k=candidates, **options)
        by_text = (
            self.annotate(_document=document)
            .filter(_document=search_query)
            .annotate(_text_rank=SearchRank(document, search_query, cover_density=True))
            .order_by("-_text_rank", "pk")
        )
        by_text.query.clear_limits()
        by_text = by_text[:candidates]
        values = by_vector._index_settings()
        vector_sql, vector_params = by_vector._runner(values).values("pk", "distance").query.sql_with_params()
        text_sql, text_params = by_text.values("pk", "_text_rank").query.sql_with_params()
        rrf = semantic_settings.HYBRID_RRF_K
        fused = (
            "SELECT coalesce(v.pk, t.pk), "
            "coalesce(%s::float8 / (%s + v.rank), 0) + coalesce(%s::float8 / (%s + t.rank), 0) AS fused, "
            "v.rank, t.rank, v.distance "
            "FROM (SELECT vc.*, row_number() OVER (ORDER BY vc.distance, vc.pk) AS rank "
            f"      FROM (SELECT c.* FROM ({vector_sql}) AS c(pk, distance)) AS vc) AS v "
            "FULL OUTER JOIN (SELECT tc.pk, row_number() OVER (ORDER BY tc.text_rank DESC, tc.pk) AS rank "
            f"      FROM ({text_sql}) AS tc(pk, text_rank)) AS t ON v.pk = t.pk "
            "ORDER BY fused DESC, coalesce(v.rank, t.rank) LIMIT %s"
        )
        params = [vector_weight, rrf, text_weight, rrf, *vector_params, *text_params, k]
        metric = get_metric(embedding_field.metric)
        with by_vector._search_settings(values), connections[self.db].cursor() as cursor:
            cursor.execute(fused, params)
            rows = cursor.fetchall()
        ranked = [
            (
                pk,
                {
                    "hybrid_score": score,
                    "vector_rank": vector_rank,
                    "text_rank": text_rank,
                    "distance": distance,
                    "score": None if distance is None else metric.score_of(distance),
                },
            )
            for pk, score, vector_rank, text_rank, distance in rows
        ]
        return self.pinned(ranked, "-hybrid_score")

    # --- index settings, applied per query ------------------------------------

    def _clone(self):
        clone = super()._clone()
        clone._search_plan = self._search_plan
        return clone

    def _fetch_all(self):
        if self._result_cache is not None or self._search_plan is None:
            return super()._fetch_all()
        values = self._index_settings()
        runner = self._runner(values)
        with runner._search_settings(values):
            super(SemanticQuerySet, runner)._fetch_all()
        self._result_cache = runner._result_cache
        self._prefetch_done = runner._prefetch_done
        rows = self._result_cache
        if self.query.order_by == ("distance",) and rows:
            # Relaxed-order iterative scans may return neighbours slightly
            # out of order; the rows are right, so sort them here.
            if isinstance(rows[0], models.Model):
                rows.sort(key=lambda row: row.distance)
            elif isinstance(rows[0], dict) and "distance" in rows[0]:
                rows.sort(key=lambda row: row["distance"])
            elif isinstance(rows[0], tuple) and "distance" in (self._fields or ()):
                position = self._fields.index("distance")
                rows.sort(key=lambda row: row[position])
            elif self._fields == ("distance",):
                rows.sort()
        if self._search_plan.chunk_model is not None and rows and isinstance(rows[0], models.Model):
            chunks = self._search_plan.chunk_model._base_manager.using(self.db).in_bulk(
                [row.best_chunk_id for row in rows]
            )
            for row in rows:
                row.best_chunk = chunks.get(row.best_chunk_id)

    def iterator(self, chunk_size=None):
        if self._search_plan is None:
            yield from super().iterator(chunk_size=chunk_size)
            return
        values = self._index_settings()
        runner = self._runner(values)
        with runner._search_settings(values):
            yield from super(SemanticQuerySet, runner).iterator(chunk_size=chunk_size)

    def count(self):
        if self._search_plan is None or self._result_cache is not None:
            return super().count()
        values = self._index_settings()
        runner = self._runner(values)
        with runner._search_settings(values):
            return super(SemanticQuerySet, runner).count()

    def exists(self):
        if self._search_plan is None or self._result_cache is not None:
            return super().exists()
        return self.count() > 0 if self.query.is_sliced else self[:1].count() > 0

    def explain(self, *, format=None, **options):
        """EXPLAIN under this search's index settings, so the plan shown is the plan used."""
        if self._search_plan is None:
            return super().explain(format=format, **options)
        values = self._index_settings()
        runner = self._runner(values)
        with runner._search_settings(values):
            return super(SemanticQuerySet, runner).explain(format=format, **options)

    def search_settings(self):
        """The settings this search would run under, e.g. {"hnsw.ef_search": 40, ...}.

        ``{"enable_indexscan": "off"}`` means an exact scan. Empty for a
        QuerySet that is not a vector search. May query the planner.
        """
        return self._index_settings() if self._search_plan is not None else {}

    def _runner(self, values):
        """The QuerySet actually executed for this search.

        Ranking by chunk needs more than annotations: through the index, the
        rows considered are the owners of the best chunks among the filtered
        rows' chunks (found by the chunk table's own vector index); exactly,
        every filtered row is. The chunk-level ``min_score`` is applied here
        too, so that the owner subquery stays free of distance computations.
        """
        plan = self._search_plan
        if plan.chunk_model is None:
            return self
        runner = self._chain()
        # Filters go under the slice: lift it, filter, put it back.
        low, high = runner.query.low_mark, runner.query.high_mark
        runner.query.clear_limits()
        if "enable_indexscan" not in values:
            owners = runner._chain()
            owners.query.clear_ordering(force=True)
            owners._search_plan = None
            limit = high or MAX_INDEX_LIMIT
            candidates = (
                plan.chunk_model._base_manager.using(self.db)
                .filter(owner__in=owners.values("pk"))
                .annotate(_distance=plan.chunk_distance)
                .order_by("_distance")
                .values("owner_id")[: min(limit, MAX_INDEX_LIMIT) * CHUNKS_PER_RESULT]
            )
            runner = runner.filter(pk__in=candidates)
        if plan.max_distance is not None:
            runner = runner.filter(distance__lte=plan.max_distance)
        runner.query.set_limits(low, high)
        return runner

    @contextmanager
    def _search_settings(self, values):
        """Run the block with this search's planner and index settings.

        ``set_config(..., true)`` is ``SET LOCAL``: it lasts until the end of
        the transaction. Outside a transaction one is opened for the query;
        inside one, a savepoint is rolled back afterwards (the search only
        read), which undoes the settings without touching the caller's work.
        """
        connection = connections[self.db]
        if connection.vendor != "postgresql":
            yield
            return
        if not connection.in_atomic_block:
            with transaction.atomic(using=self.db):
                _set_local(connection, values)
                yield
            return
        savepoint = transaction.savepoint(using=self.db)
        try:
            _set_local(connection, values)
            yield
        finally:
            if self.query.select_for_update:
                # Rolling back would release the rows just locked.
                transaction.savepoint_commit(savepoint, using=self.db)
            else:
                transaction.savepoint_rollback(savepoint, using=self.db)

    def _index_settings(self):
        plan = self._search_plan
        limit = self.query.high_mark
        exact = plan.exact
        if exact is None:
            exact = (
                limit is None
                or limit > MAX_INDEX_LIMIT
                or self._estimated_rows() <= semantic_settings.EXACT_SEARCH_THRESHOLD
            )
        if exact:
            # HNSW and IVFFlat only offer ordered index scans; without them
            # the planner filters (bitmap scans on other indexes still work)
            # and sorts by the exact distance.
            return {"enable_indexscan": "off"}
        mode = plan.iterative_scan or semantic_settings.ITERATIVE_SCAN
        ef_search = plan.ef_search or semantic_settings.EF_SEARCH or DEFAULT_EF_SEARCH
        if limit is not None:
            ef_search = max(ef_search, limit)
        values = {
            # The index is wanted: on a small table the planner would rather
            # sort the whole table. A selective filter can still be served by
            # a B-tree bitmap scan, which is exact.
            "enable_seqscan": "off",
            "hnsw.ef_search": min(int(ef_search), MAX_INDEX_LIMIT),
            "hnsw.iterative_scan": mode,
            # IVFFlat knows no strict order.
            "ivfflat.iterative_scan": "off" if mode == "off" else "relaxed_order",
        }
        probes = plan.probes or semantic_settings.PROBES
        if probes:
            values["ivfflat.probes"] = int(probes)
        return values

    def _estimated_rows(self):
        """The planner's estimate of the rows the search's filters leave."""
        probe = self._chain()
        probe._search_plan = None
        probe.query.clear_ordering(force=True)
        probe.query.clear_limits()
        sql, params = probe.values("pk").query.sql_with_params()
        with connections[self.db].cursor() as cursor:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            plan = cursor.fetchone()[0]
        if isinstance(plan, str):
            plan = json.loads(plan)
        return plan[0]["Plan"]["Plan Rows"]

    # --- results pinned by a score computed outside the database -------------

    def pinned(self, ranked, order_by, rows=None):
        """A QuerySet of exactly the rows in ``ranked``, annotated and ordered.

        ``ranked`` is a list of (pk, {annotation: value}) best first. The
        scores live in the SQL (``CASE`` by primary key), so the QuerySet can
        still be filtered, counted and paginated; evaluating it as it is
        costs no query when ``rows`` ({pk: instance}) are given or can be
        fetched plainly, which is cheaper than compiling the ``CASE``s.
        """
        if not ranked:
            return self.none()
        annotations = {}
        for name in ranked[0][1]:
            annotations[name] = Case(
                *[When(pk=pk, then=Value(values[name])) for pk, values in ranked],
                output_field=FloatField(),
            )
        position = Case(*[When(pk=pk, then=Value(i)) for i, (pk, _) in enumerate(ranked)], output_field=IntegerField())
        pks = [pk for pk, _ in ranked]
        queryset = self.filter(pk__in=pks)
        queryset.query.clear_ordering(force=True)
        queryset._search_plan = None
        pinned = queryset.annotate(**annotations).annotate(_rank=position).order_by(order_by, "_rank")
        if pinned._iterable_class is not ModelIterable:
            return pinned
        if rows is None:
            plain = self.filter(pk__in=pks)
            plain.query.clear_ordering(force=True)
            plain._search_plan = None
            rows = {row.pk: row for row in plain}
        ordered = []
        for rank, (pk, values) in enumerate(ranked):
            row = rows.get(pk)
            if row is None:
                return pinned  # deleted meanwhile: let the database say what is left
            for name, value in values.items():
                setattr(row, name, value)
            row._rank = rank
            ordered.append(row)
        pinned._result_cache = ordered
        pinned._prefetch_done = True
        return pinned

    def _reranked(self, query, embedding_field, vector, *, k, candidates, min_score, options):
        from semantic.rerank import get_reranker

        reranker = get_reranker()
        candidates = max(int(candidates or semantic_settings.RERANK_CANDIDATES), k)
        rows = list(self.nearest(vector, field=embedding_field.name, k=candidates, min_score=min_score, **options))
        # A chunked row is judged by its best passage: cross-encoders read
        # a few hundred tokens, not a whole document.
        texts = [row.best_chunk.text if getattr(row, "best_chunk", None) else embedding_field.build_text(row) for row in rows]
        scores = reranker.score(query, texts) if rows else []
        order = sorted(range(len(rows)), key=lambda i: -scores[i])[:k]
        ranked = [
            (rows[i].pk, {"rerank_score": float(scores[i]), "distance": rows[i].distance, "score": rows[i].score})
            for i in order
        ]
        return self.pinned(ranked, "-rerank_score", rows={row.pk: row for row in rows})


class SearchPlan:
    """How a search finds its rows; carried by clones of the QuerySet."""

    def __init__(self, exact=None, ef_search=None, probes=None, iterative_scan=None):
        self.exact = exact
        self.ef_search = ef_search
        self.probes = probes
        self.iterative_scan = iterative_scan
        # Ranking by chunk: the chunk model, the distance expression over its
        # vectors, and the largest distance min_score allows.
        self.chunk_model = None
        self.chunk_distance = None
        self.max_distance = None


SemanticQuerySet._search_plan = None

# pgvector's defaults and limits: hnsw.ef_search is 40 unless set and at most
# 1000; an index scan returns at most ef_search rows without iterative scans.
DEFAULT_EF_SEARCH = 40
MAX_INDEX_LIMIT = 1000
ITERATIVE_SCAN_MODES = ("relaxed_order", "strict_order", "off")
# Chunks fetched through the index per result wanted: a row with several
# close chunks takes several places, so fetch more than k.
CHUNKS_PER_RESULT = 5


def _set_local(connection, values):
    if not values:
        return
    selects = ", ".join(["set_config(%s, %s, true)"] * len(values))
    params = [str(part) for name, value in values.items() for part in (name, value)]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {selects}", params)


def text_search_document(field, text_fields=None, config=None):
    """What hybrid search ranks by text: a SearchVectorField column, or ``text_fields`` to vectorise.

    ``text_fields`` defaults to the field's source fields that are columns;
    ``config`` to SEMANTIC["HYBRID_TEXT_CONFIG"]. ImproperlyConfigured when
    there is no column to search.
    """
    from django.contrib.postgres.search import SearchVector

    model = field.model
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    if text_fields is None:
        text_fields = [name for name in field.source_names() if is_column(model, name)]
        if not text_fields:
            raise ImproperlyConfigured(
                f"{model.__name__}.{field.name} has no source fields that are columns; pass text_fields=[...]."
            )
    for name in text_fields:
        if not is_column(model, name):
            raise ImproperlyConfigured(f"{model.__name__}.{name} is not a column to search by text.")
    if len(text_fields) == 1 and model._meta.get_field(text_fields[0]).get_internal_type() == "SearchVectorField":
        return models.F(text_fields[0])
    return SearchVector(*text_fields, config=config or semantic_settings.HYBRID_TEXT_CONFIG)


def _check_query(query):
    if not isinstance(query, str) or not query.strip():
        raise ValueError("semantic_search() needs a non-empty query string.")


def _check_k(k):
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, not {k!r}.")


def _as_query_vector(vector, field):
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or (field.dimensions and array.shape[0] != field.dimensions):
        raise ValueError(
            f"{field.model.__name__}.{field.name} holds {field.dimensions}-dimensional vectors; "
            f"the query vector has shape {array.shape}."
        )
    return array


# Query embeddings seen recently by this process: a repeated query costs no
# model call and no cache round trip. Keys carry the encoder fingerprint.
_QUERY_VECTORS = OrderedDict()
QUERY_VECTORS_IN_PROCESS = 1024


def embed_query(field, query):
    """The query's embedding under ``field``'s encoder.

    Looked up in this process's recent queries, then in the hashed-text
    cache, and only then encoded (with the model's query prefix).
    """
    encoder = field.encoder
    text = clean_text(query)
    key = encoder.text_hash(text, query=True)
    vector = _QUERY_VECTORS.get(key)
    if vector is None:
        vector = embedding_cache.get_vectors([key]).get(key)
    if vector is None:
        field.verify_encoder()
        vectors, failures = encoder.encode([text], query=True)
        if failures:
            raise RuntimeError(f"The query could not be encoded: {failures[0]}.")
        vector = vectors[0]
        embedding_cache.set_vectors({key: vector})
    _QUERY_VECTORS[key] = vector
    _QUERY_VECTORS.move_to_end(key)
    while len(_QUERY_VECTORS) > QUERY_VECTORS_IN_PROCESS:
        _QUERY_VECTORS.popitem(last=False)
    return vector


class SemanticManager(models.Manager.from_queryset(SemanticQuerySet)):
    """Manager exposing semantic_search() and nearest() on ``Model.objects``."""
