"""
SemanticQuerySet: similarity search that composes with the ORM.

::

    Article.objects.filter(topic="tech").semantic_search("new phones")[:10]
    Article.objects.semantic_search("new phones").filter(score__gte=0.3)[:10]

``semantic_search`` returns an ordinary, unsliced QuerySet ordered by
distance, with ``distance`` and ``score`` annotated, so any filter can be
added before or after; slice it (or pass ``k``) to take the top results.
"""

from django.db import models
from django.db.models.query import ModelIterable

from semantic.conf import semantic_settings
from semantic.fields import embedding_fields, get_embedding_field
from semantic.retrieval import diversified, hybrid, nearest, pinned, reranked
from semantic.retrieval.options import DiversityOptions, SearchOptions, check_candidates, check_k, clean_query
from semantic.retrieval.query_vectors import embed_query
from semantic.status import stale_marks
from semantic.switching import live_slot
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
    # The search itself lives in semantic.retrieval; these methods check their
    # arguments and hand over.

    def semantic_search(
        self,
        query,
        *,
        field=None,
        k=None,
        min_score=None,
        rerank=False,
        candidates=None,
        collapse=None,
        diversity=None,
        **options,
    ):
        """Rows ordered by distance to the embedding of ``query``.

        Annotates ``distance`` and ``score`` (similarity, higher is closer;
        see semantic.distances for each metric). Rows without a vector, and
        rows whose vector was made under another encoder configuration (model,
        prefix, normalisation, chunking) until the worker re-embeds them, are
        left out. The result is an ordinary lazy QuerySet: filter it before
        or after, slice it, or pass ``k``. ``min_score`` keeps rows at least
        that similar. ``options`` are the index options of ``nearest``
        (``exact``, ``ef_search``, ``probes``, ``iterative_scan``, ``by_chunk``).

        ``rerank=True`` takes ``candidates`` rows (default
        SEMANTIC["RERANK_CANDIDATES"]) from the vector search, scores each
        (query, text) pair with the configured cross-encoder and returns the
        top ``k`` (default 10) ordered by ``rerank_score``, with ``distance``
        and ``score`` still annotated. That evaluates the candidates at once;
        the returned QuerySet holds just those rows.

        ``collapse`` and ``diversity`` (both off by default) choose the top
        ``k`` (default 10) from the search's ``candidates`` best rows
        (default SEMANTIC["DIVERSITY_CANDIDATES"], at least k), in one pass:
        ``collapse=True`` (or a cosine threshold in (0, 1]; True is
        SEMANTIC["COLLAPSE_THRESHOLD"]) drops each row whose row vector is
        at least that similar to a better-ranked row kept, so copies of one
        text show once; ``diversity`` in (0, 1] then orders the rest by
        maximal marginal relevance (semantic.retrieval.diversity: 0 is the
        plain ranking, higher values trade relevance for rows unlike those
        above them). The result is evaluated at once, like reranking's, and
        ordered as chosen (not by ``score``). With ``rerank=True`` the
        cross-encoder orders the rerank candidates first, and collapse and
        diversity choose from that order, by ``rerank_score``.

        The query's control characters become spaces (semantic.retrieval.options.clean_query).
        Raises ValueError for an empty query or one longer than
        SEMANTIC["QUERY_MAX_CHARS"], a ``k`` or ``candidates`` outside 1 to
        SEMANTIC["MAX_K"] / ["MAX_CANDIDATES"], or an option out of range;
        TypeError for an unknown option, or for ``collapse``/``diversity``
        on a ``values()`` QuerySet (call ``values()`` on the result).
        """
        query = clean_query(query)
        check_k(k)
        check_candidates(candidates)
        spread = self._diversity_options(collapse, diversity)
        search_options = SearchOptions.from_kwargs(**options)
        embedding_field = get_embedding_field(self.model, field)
        # The slot (semantic.switching) chosen once: the query vector and
        # the vectors it is compared with come from the same configuration.
        slot = live_slot(embedding_field, self.db)
        vector = embed_query(slot, query)
        if not rerank and spread is None:
            return self._nearest(vector, slot, k, min_score, search_options)
        k = k or 10
        if not rerank:
            by_vector = self._nearest(vector, slot, spread.pool(k, candidates), min_score, search_options)
            candidates = diversified.with_row_vectors(by_vector, slot)
            return diversified.diversified(self, candidates, spread, k, ("score", "distance"))
        by_vector = self._nearest(vector, slot, reranked.rerank_candidates(k, candidates), min_score, search_options)
        if spread is None:
            return reranked.reranked(self, by_vector, query, embedding_field, k=k)
        # Every candidate, ordered by the cross-encoder; then the choice.
        by_reranker = reranked.reranked(
            diversified.with_row_vectors(self, slot),
            diversified.with_row_vectors(by_vector, slot),
            query,
            embedding_field,
            k=by_vector.query.high_mark,
        )
        return diversified.diversified(self, by_reranker, spread, k, ("rerank_score", "distance", "score"))

    def nearest(self, vector, *, field=None, k=None, min_score=None, collapse=None, diversity=None, **options):
        """Like semantic_search, for a query vector already computed.

        How the rows are found (semantic.retrieval.options.SearchOptions),
        applied with ``SET LOCAL`` inside the query's own transaction (a
        savepoint rolled back afterwards when the caller is already in one),
        so nothing leaks to other queries:

        * ``exact=True`` disables index scans: every row that passes the
          filters is compared, so the top k are exact.
        * ``exact=False`` uses the HNSW/IVFFlat index (sequential scans off)
          with iterative scans (pgvector >= 0.8), so a filtered search still
          returns k rows.
        * ``exact=None`` (default) is exact when an exact scan would compare
          at most SEMANTIC["EXACT_SEARCH_THRESHOLD"] vectors (the filtered
          rows, or their chunks, by the planner's estimate), when the search
          is not sliced, or when k exceeds what an index scan can return
          (1000); otherwise it offers the index with the settings above,
          leaving sequential scans on (a plan the planner costs lower is
          exact). When the connection already has those settings
          (semantic.retrieval.session.connection_options) the search runs in
          one round trip.

        ``ef_search`` (HNSW, default SEMANTIC["EF_SEARCH"] or pgvector's 40,
        raised to k when k is larger), ``probes`` (IVFFlat) and
        ``iterative_scan`` ("relaxed_order", "strict_order", "off") override
        the settings for this query.

        A field with ``chunks=True`` ranks each row by its best-matching
        chunk (``by_chunk``, default True for such fields), in one statement
        (semantic.retrieval.chunks): ``distance`` is that chunk's,
        ``best_chunk_id`` names it, and fetched instances carry it as
        ``row.best_chunk`` (with ``text``, ``start``, ``end``). Each row comes
        once. ``by_chunk=False`` ranks by the row's own vector (the mean of
        its chunks).

        ``collapse`` and ``diversity`` as in semantic_search, over the top
        SEMANTIC["DIVERSITY_CANDIDATES"] rows (at least ``k``, default 10).
        """
        check_k(k)
        spread = self._diversity_options(collapse, diversity)
        search_options = SearchOptions.from_kwargs(**options)
        slot = live_slot(get_embedding_field(self.model, field), self.db)
        if spread is None:
            return self._nearest(vector, slot, k, min_score, search_options)
        return self._nearest_diversified(vector, slot, k, min_score, search_options, spread)

    def _nearest(self, vector, slot, k, min_score, options):
        return nearest.build(self, vector, slot, k=k, min_score=min_score, options=options)

    def _nearest_diversified(self, vector, slot, k, min_score, options, spread):
        k = k or 10
        by_vector = self._nearest(vector, slot, spread.pool(k), min_score, options)
        candidates = diversified.with_row_vectors(by_vector, slot)
        return diversified.diversified(self, candidates, spread, k, ("score", "distance"))

    def _diversity_options(self, collapse, diversity):
        """Validated ``collapse``/``diversity`` (None when both are off); TypeError on a values() QuerySet."""
        spread = DiversityOptions.from_args(collapse, diversity)
        if spread is not None and self._iterable_class is not ModelIterable:
            raise TypeError(
                "collapse and diversity choose among model instances; search first, then call values() or values_list()."
            )
        return spread

    def similar_to(self, obj, *, field=None, k=None, min_score=None, collapse=None, diversity=None, **options):
        """Rows nearest to ``obj``'s stored vector, ``obj`` itself left out.

        ``obj`` is an instance or a primary key. Raises ValueError when it has
        no vector yet (its text is empty, or the worker has not embedded it).
        Accepts the index options of ``nearest`` and its ``collapse`` and
        ``diversity`` (``obj`` is not a candidate, so of its own copies the
        best-ranked one is kept, like any group of copies); rows are compared
        by their own vectors unless ``by_chunk=True``.
        """
        check_k(k)
        spread = self._diversity_options(collapse, diversity)
        embedding_field = get_embedding_field(self.model, field)
        slot = live_slot(embedding_field, self.db)
        pk = obj.pk if isinstance(obj, models.Model) else obj
        vector = (
            self.model._base_manager.using(self.db)
            .filter(slot.searchable_q(), pk=pk)
            .annotate(_semantic_vector=slot.vector())
            .values_list("_semantic_vector", flat=True)
            .first()
        )
        if vector is None:
            raise ValueError(
                f"{self.model.__name__} {pk!r} has no searchable {embedding_field.name} vector "
                f"(it does not exist, its text is empty, or it is waiting for the worker)."
            )
        # Whole row against whole rows: the row vector is what "similar" means here.
        options.setdefault("by_chunk", False)
        search_options = SearchOptions.from_kwargs(**options)
        others = self.exclude(pk=pk)
        if spread is None:
            return others._nearest(vector, slot, k, min_score, search_options)
        return others._nearest_diversified(vector, slot, k, min_score, search_options, spread)

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
        collapse=None,
        diversity=None,
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

        ``collapse`` and ``diversity`` as in semantic_search: they choose the
        top ``k`` from the SEMANTIC["DIVERSITY_CANDIDATES"] best fused rows
        (at least k), MMR weighing ``hybrid_score`` as relevance.
        """
        query = clean_query(query)
        check_k(k)
        check_candidates(candidates)
        spread = self._diversity_options(collapse, diversity)
        search_options = SearchOptions.from_kwargs(**options)
        embedding_field = get_embedding_field(self.model, field)
        candidates = max(int(candidates or semantic_settings.HYBRID_CANDIDATES), k)
        slot = live_slot(embedding_field, self.db)
        by_vector = self._nearest(embed_query(slot, query), slot, candidates, None, search_options)
        fused = hybrid.hybrid_search(
            # The fused rows are fetched from this QuerySet: with collapse or
            # diversity they bring their row vectors along.
            self if spread is None else diversified.with_row_vectors(self, slot),
            by_vector,
            query,
            embedding_field,
            k=k if spread is None else spread.pool(k),
            text_fields=text_fields,
            weights=weights,
            candidates=candidates,
            config=config,
        )
        if spread is None:
            return fused
        return diversified.diversified(self, fused, spread, k, ("hybrid_score", "vector_rank", "text_rank", "distance", "score"))

    def pinned(self, ranked, order_by=pinned.RANK, rows=None, types=None):
        """A QuerySet of exactly the rows in ``ranked``, annotated and ordered (see semantic.retrieval.pinned)."""
        if self._search_plan is not None:
            raise TypeError("pinned() takes the rows before a search, not a search.")
        return pinned.pinned(self, ranked, order_by, rows, types)

    # --- evaluation under the search's index settings --------------------------

    def _clone(self):
        clone = super()._clone()
        clone._search_plan = self._search_plan
        return clone

    def _fetch_all(self):
        if self._result_cache is not None or self._search_plan is None:
            return super()._fetch_all()

        def fetch_all(runner):
            super(SemanticQuerySet, runner)._fetch_all()
            return runner._result_cache

        rows, runner = nearest.fetch(self, fetch_all)
        self._result_cache = rows
        self._prefetch_done = runner._prefetch_done

    def iterator(self, chunk_size=None):
        if self._search_plan is None:
            yield from super().iterator(chunk_size=chunk_size)
        elif self.query.chunk_search is None:
            yield from nearest.stream(self, lambda runner: super(SemanticQuerySet, runner).iterator(chunk_size=chunk_size))
        else:
            # A search by chunk may run twice (a short bounded scan) and
            # attaches best chunks: its rows are fetched whole.
            self._fetch_all()
            yield from self._result_cache

    def count(self):
        if self._search_plan is None or self._result_cache is not None:
            return super().count()
        return nearest.run(self, lambda runner: super(SemanticQuerySet, runner).count())

    def exists(self):
        if self._search_plan is None or self._result_cache is not None:
            return super().exists()
        return nearest.run(self, lambda runner: super(SemanticQuerySet, runner).exists())

    def explain(self, *, format=None, **options):
        """EXPLAIN under this search's index settings, so the plan shown is the plan used."""
        if self._search_plan is None:
            return super().explain(format=format, **options)
        return nearest.run(self, lambda runner: super(SemanticQuerySet, runner).explain(format=format, **options))

    def search_settings(self):
        """The settings this search would run under, e.g. {"hnsw.ef_search": 40, ...}.

        ``{"enable_indexscan": "off"}`` means an exact scan. Empty for a
        QuerySet that is not a vector search. May query the planner.
        """
        return nearest.index_settings(self) if self._search_plan is not None else {}


SemanticQuerySet._search_plan = None


class SemanticManager(models.Manager.from_queryset(SemanticQuerySet)):
    """Manager exposing semantic_search() and nearest() on ``Model.objects``."""
