"""
Retrieval quality: metrics, labelled queries, and evaluations.

* Metrics over one ranking with binary relevance: ``recall_at_k``,
  ``mrr_at_k``, ``ndcg_at_k``; ``score_rankings`` averages them over queries.
* Labelled queries (``load_queries``): a JSONL file of
  ``{"query": "...", "relevant": [id, ...]}`` lines, a CSV file with the
  columns ``query`` and ``relevant`` (ids separated by ``|``), a callable
  (or its dotted path) returning such records, or the records themselves.
* ``evaluate(queryset, queries)`` runs every search mode through the real ORM
  API (``semantic_search`` exact and through the index, ``hybrid_search``,
  ``semantic_search(rerank=True)``, and a plain PostgreSQL full-text
  baseline) and reports the metrics and the time per query of each.
* ``evaluate_pairs(pairs, encode)`` needs no database: known-item retrieval
  of each (query, positive) pair's positive among all the positives, ranked
  by exact cosine in numpy, optionally reranked. The fine-tune command uses it
  to compare a model before and after training.

Ids are compared as strings, so labels read from CSV ("12") match integer
primary keys, and ``id_field`` lets labels name a natural key instead.
"""

import csv
import json
import math
import re
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import numpy as np

#: Every mode ``evaluate`` knows, in the order it reports them.
MODES = ("exact", "vector", "hybrid", "rerank", "fulltext", "fulltext_any")
MODE_HELP = {
    "exact": "semantic_search(exact=True): every row compared",
    "vector": "semantic_search(exact=False): through the vector index (HNSW/IVFFlat)",
    "hybrid": "hybrid_search(): vector and full-text ranks fused (RRF)",
    "rerank": "semantic_search(rerank=True): vector candidates rescored by the cross-encoder",
    "fulltext": "PostgreSQL full text only, the query as typed (websearch_to_tsquery: every word must match, "
    "as in hybrid_search), ranked by ts_rank_cd: the baseline",
    "fulltext_any": "the same with the query's words joined by OR (any word may match)",
}
#: What names a file rather than a dotted path to a callable.
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
#: The metrics of one evaluation, besides recall at the requested k.
MRR_DEPTH = NDCG_DEPTH = 10


# --- metrics ---------------------------------------------------------------------


def _top(ranked, k):
    """The first ``k`` distinct ids of ``ranked`` as strings (a repeated id counts once, where it first appears)."""
    seen = []
    for item in ranked:
        item = str(item)
        if item not in seen:
            seen.append(item)
            if len(seen) == k:
                break
    return seen


def _relevant(relevant):
    return {str(item) for item in relevant}


def recall_at_k(ranked, relevant, k):
    """Share of the relevant ids found in the first ``k`` of ``ranked`` (0.0 when nothing is relevant)."""
    relevant = _relevant(relevant)
    if not relevant:
        return 0.0
    return len(relevant.intersection(_top(ranked, k))) / len(relevant)


def mrr_at_k(ranked, relevant, k=MRR_DEPTH):
    """1 / rank of the first relevant id within the first ``k``, else 0.0 (the reciprocal rank of one query)."""
    relevant = _relevant(relevant)
    for rank, item in enumerate(_top(ranked, k), start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked, relevant, k=NDCG_DEPTH):
    """Normalised discounted cumulative gain at ``k`` with binary relevance.

    DCG sums 1 / log2(rank + 1) over the relevant ids in the first ``k``;
    the ideal ranking puts min(|relevant|, k) of them first. 0.0 when nothing
    is relevant.
    """
    relevant = _relevant(relevant)
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(_top(ranked, k), start=1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def metric_names(k):
    """The metrics an evaluation at ``k`` reports, in table order."""
    return list(dict.fromkeys(["recall@1", f"recall@{k}", f"mrr@{MRR_DEPTH}", f"ndcg@{NDCG_DEPTH}"]))


def score_rankings(rankings, relevants, k=10):
    """Mean metrics over queries: ``rankings[i]`` is query i's ranked ids, ``relevants[i]`` its relevant ids."""
    if len(rankings) != len(relevants):
        raise ValueError(f"{len(rankings)} rankings for {len(relevants)} labelled queries.")
    totals = dict.fromkeys(metric_names(k), 0.0)
    for ranked, relevant in zip(rankings, relevants):
        for at in {1, k}:
            totals[f"recall@{at}"] += recall_at_k(ranked, relevant, at)
        totals[f"mrr@{MRR_DEPTH}"] += mrr_at_k(ranked, relevant, MRR_DEPTH)
        totals[f"ndcg@{NDCG_DEPTH}"] += ndcg_at_k(ranked, relevant, NDCG_DEPTH)
    count = len(rankings)
    return {name: (value / count if count else 0.0) for name, value in totals.items()}


# --- labelled queries --------------------------------------------------------------


@dataclass(frozen=True)
class LabelledQuery:
    """A query and the ids of the rows that answer it (strings)."""

    query: str
    relevant: frozenset


def import_callable(path):
    """The object at dotted ``path`` ("package.module.name"); ValueError with one clear line otherwise."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not a dotted path (write package.module.function).")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"Cannot import {module_name!r} for {path!r}: {exc}") from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"Module {module_name!r} has no {name!r}.") from None


def resolve_source(source):
    """What a file-or-callable option names: records from a callable, or a Path of an existing file.

    ``source`` is a callable, an iterable of records, a path to an existing
    file, or a dotted path to a callable.
    """
    if callable(source):
        return source()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            return path
        if isinstance(source, str) and "/" not in source and path.suffix.lower() not in FILE_SUFFIXES:
            target = import_callable(source)
            if not callable(target):
                raise ValueError(f"{source!r} is not callable.")
            return target()
        raise ValueError(f"No such file: {source}")
    return source


def read_records(path, csv_list_columns=()):
    """Records (dicts) from a JSONL or CSV file; CSV columns named in ``csv_list_columns`` are split on '|'."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                records = []
                for row in csv.DictReader(handle):
                    for column in csv_list_columns:
                        if row.get(column) is not None:
                            row[column] = [part.strip() for part in row[column].split("|") if part.strip()]
                    records.append(row)
                return records
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}, line {number}: not JSON ({exc.msg}).") from None
        return records
    except OSError as exc:
        raise ValueError(f"Cannot read {path}: {exc.strerror or exc}") from None


def load_queries(source):
    """Labelled queries as a list of LabelledQuery.

    ``source``: a ``.jsonl`` file of ``{"query": ..., "relevant": [ids]}``
    lines (``relevant`` may also be one id), a ``.csv`` file with columns
    ``query,relevant`` (ids separated by ``|``), a callable or the dotted
    path of one returning records, or the records: dicts like the JSONL
    lines, ``(query, relevant)`` tuples or LabelledQuery. Raises ValueError
    for a query without text or without relevant ids.
    """
    records = resolve_source(source)
    if isinstance(records, Path):
        records = read_records(records, csv_list_columns=("relevant",))
    queries = []
    for number, record in enumerate(records, start=1):
        if isinstance(record, LabelledQuery):
            queries.append(record)
            continue
        if isinstance(record, dict):
            if "query" not in record or "relevant" not in record:
                raise ValueError(f"Labelled query {number} needs the keys 'query' and 'relevant', not {sorted(record)}.")
            query, relevant = record["query"], record["relevant"]
        else:
            try:
                query, relevant = record
            except (TypeError, ValueError):
                raise ValueError(f"Labelled query {number} is neither a dict nor a (query, relevant) pair.") from None
        if isinstance(relevant, (str, int)):
            relevant = [relevant]
        relevant = frozenset(str(item) for item in relevant if str(item).strip())
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"Labelled query {number} has no query text.")
        if not relevant:
            raise ValueError(f"Labelled query {number} ({query[:60]!r}) has no relevant ids.")
        queries.append(LabelledQuery(query.strip(), relevant))
    if not queries:
        raise ValueError("No labelled queries.")
    return queries


# --- evaluation through the ORM ----------------------------------------------------


def evaluate(
    queryset,
    queries,
    *,
    modes=None,
    k=10,
    field=None,
    id_field="pk",
    reranker=None,
    candidates=None,
    text_fields=None,
    progress=False,
    slot=None,
):
    """Metrics and time per query of each search mode over ``queryset``.

    ``queries``: anything load_queries accepts. ``modes``: names from MODES;
    None runs every mode available (``rerank`` only when ``reranker`` is
    given or SEMANTIC["RERANKER"] is set, ``fulltext`` and ``hybrid`` only
    when the field's text comes from columns or ``text_fields`` is given). A
    mode asked for by name that cannot run raises ImproperlyConfigured.
    ``id_field`` names the column the labels' ids refer to (default the
    primary key). ``reranker``: a CrossEncoder directory or a RERANKER dict
    used for this evaluation instead of SEMANTIC["RERANKER"].
    ``candidates``: rows the reranker reads per query (default
    SEMANTIC["RERANK_CANDIDATES"]). ``progress``: a tqdm bar per mode.
    ``slot``: the slot searched (semantic.slots; a switch's next slot, to
    compare it with the declared one before promoting), default the live one.

    Every mode ranks the same rows: those with a current vector (a search
    leaves stale rows out); the full-text baseline is restricted to them too.
    Query vectors are computed once, before any mode is timed, so
    ``ms_per_query`` is the search itself (plus the cross-encoder for
    rerank). Returns ``{"k", "queries", "rows", "unreachable",
    "embed_queries_seconds", "metrics" (the metric names, in order),
    "modes": {mode: {metric: value, ..., "ms_per_query", "seconds"}},
    "skipped": {mode: reason}}``; ``unreachable`` counts queries none of
    whose relevant ids is among the searched rows.
    """
    from django.core.exceptions import ImproperlyConfigured

    from semantic import switching
    from semantic.fields import get_embedding_field
    from semantic.retrieval.query_vectors import embed_query
    from semantic.rerank import is_reranking_configured

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}.")
    queries = load_queries(queries)
    embedding_field = get_embedding_field(queryset.model, field)
    unknown = [mode for mode in modes or () if mode not in MODES]
    if unknown:
        raise ValueError(f"Unknown mode(s): {', '.join(unknown)}. Modes: {', '.join(MODES)}.")
    has_text = _text_document(embedding_field, text_fields) is not None
    reasons = {}
    if not has_text:
        for mode in ("hybrid", "fulltext", "fulltext_any"):
            reasons[mode] = f"{embedding_field.model.__name__}.{embedding_field.name} has no text columns; pass text_fields"
    if reranker is None and not is_reranking_configured():
        reasons["rerank"] = "no reranker: set SEMANTIC['RERANKER'] or pass one"
    if modes is None:
        run = [mode for mode in MODES if mode not in reasons]
        skipped = {mode: reasons[mode] for mode in MODES if mode in reasons}
    else:
        blocked = [mode for mode in modes if mode in reasons]
        if blocked:
            raise ImproperlyConfigured(f"Mode {blocked[0]!r} cannot run: {reasons[blocked[0]]}.")
        run, skipped = [mode for mode in MODES if mode in modes], {}

    if slot is None:
        slot = switching.live_slot(embedding_field, queryset.db)
    searched = queryset.filter(slot.searchable_q())
    found_ids = {
        str(value)
        for value in searched.filter(
            **{f"{id_field}__in": sorted({item for query in queries for item in query.relevant})}
        ).values_list(id_field, flat=True)
    }
    unreachable = sum(1 for query in queries if not query.relevant & found_ids)
    depth = max(k, MRR_DEPTH, NDCG_DEPTH)

    started = time.perf_counter()
    for query in queries:
        embed_query(slot, query.query)
    embed_seconds = time.perf_counter() - started

    results = {}
    # Every mode searches the slot evaluated, whichever answers the site's searches.
    with switching.searching(slot):
        for mode in run:
            rank = _ranker(mode, searched, embedding_field, id_field, depth, candidates, text_fields)
            with _reranker_override(reranker if mode == "rerank" else None):
                if mode == "rerank":
                    from semantic.rerank import get_reranker

                    get_reranker()  # load it before timing
                rankings, seconds = _run_queries(rank, queries, mode, progress)
            metrics = score_rankings(rankings, [query.relevant for query in queries], k)
            results[mode] = {**metrics, "ms_per_query": 1000 * seconds / len(queries), "seconds": seconds}
    return {
        "k": k,
        "slot": {"alias": slot.alias, "next": slot.is_next, "dimensions": slot.dimensions},
        "queries": len(queries),
        "rows": searched.count(),
        "unreachable": unreachable,
        "embed_queries_seconds": embed_seconds,
        "metrics": metric_names(k),
        "modes": results,
        "skipped": skipped,
    }


def _run_queries(rank, queries, mode, progress):
    from tqdm import tqdm

    rankings = []
    seconds = 0.0
    for query in tqdm(queries, desc=mode, unit="query", disable=not progress, leave=False):
        started = time.perf_counter()
        rankings.append(rank(query.query))
        seconds += time.perf_counter() - started
    return rankings, seconds


def _text_document(field, text_fields):
    """The full-text document of the field's text columns (see hybrid_search), or None when it has none."""
    from django.core.exceptions import ImproperlyConfigured

    from semantic.retrieval.hybrid import text_search_document

    try:
        return text_search_document(field, text_fields)
    except ImproperlyConfigured:
        if text_fields is not None:
            raise
        return None


def _ranker(mode, queryset, field, id_field, depth, candidates, text_fields):
    """A function query -> ranked ids of the first ``depth`` rows by ``mode``."""
    from operator import attrgetter

    value_of = attrgetter("pk" if id_field == "pk" else id_field)

    def by_vector(exact):
        def rank(query):
            rows = queryset.semantic_search(query, field=field.name, k=depth, exact=exact)
            # With "distance" among the values, rows of a relaxed-order index
            # scan come back sorted (see SemanticQuerySet._fetch_all).
            return [row[0] for row in rows.values_list(id_field, "distance")]

        return rank

    if mode == "exact":
        return by_vector(True)
    if mode == "vector":
        return by_vector(False)
    if mode == "hybrid":
        return lambda query: [
            value_of(row) for row in queryset.hybrid_search(query, field=field.name, k=depth, text_fields=text_fields)
        ]
    if mode == "rerank":
        return lambda query: [
            value_of(row)
            for row in queryset.semantic_search(query, field=field.name, k=depth, rerank=True, candidates=candidates)
        ]
    return _fulltext_ranker(queryset, field, id_field, depth, text_fields, any_word=mode == "fulltext_any")


def _fulltext_ranker(queryset, field, id_field, depth, text_fields, any_word=False):
    from django.contrib.postgres.search import SearchQuery

    from semantic.conf import semantic_settings
    from semantic.retrieval.hybrid import text_ranking

    config = semantic_settings.HYBRID_TEXT_CONFIG
    document = _text_document(field, text_fields)

    def rank(query):
        if any_word:
            # Only word characters, joined by websearch_to_tsquery's OR: no
            # other operator can slip in from the query.
            query = " or ".join(re.findall(r"\w+", query)) or query
        search_query = SearchQuery(query, search_type="websearch", config=config)
        return list(text_ranking(queryset, document, search_query).values_list(id_field, flat=True)[:depth])

    return rank


class _reranker_override:
    """Run a block with SEMANTIC["RERANKER"] set to ``reranker`` (nothing when None)."""

    def __init__(self, reranker):
        self.override = None
        if reranker is not None:
            from django.conf import settings
            from django.test.utils import override_settings

            current = getattr(settings, "SEMANTIC", {}) or {}
            self.override = override_settings(SEMANTIC={**current, "RERANKER": reranker})

    def __enter__(self):
        if self.override is not None:
            self.override.enable()

    def __exit__(self, *exc_info):
        if self.override is not None:
            self.override.disable()


# --- evaluation without a database -------------------------------------------------


def evaluate_pairs(pairs, encode, *, k=10, rerank=None, candidates=20, progress=False):
    """Known-item retrieval over (query, positive) pairs, ranked by exact cosine in numpy.

    Each query's relevant document is its own positive; the corpus is every
    distinct positive of ``pairs``. ``encode(texts, query)`` returns one
    vector per text (``query`` says which prefix to use). ``rerank(query,
    texts)`` (optional) returns one score per text and reorders each query's
    first ``candidates`` documents. Returns the metrics (see score_rankings)
    plus ``seconds``.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    pairs = list(pairs)
    documents = list(dict.fromkeys(positive for _, positive in pairs))
    position = {text: index for index, text in enumerate(documents)}
    relevant = [{position[positive]} for _, positive in pairs]
    query_vectors = _unit(np.asarray(encode([query for query, _ in pairs], True), dtype=np.float32))
    document_vectors = _unit(np.asarray(encode(documents, False), dtype=np.float32))
    depth = min(max(k, MRR_DEPTH, NDCG_DEPTH, candidates if rerank else 0), len(documents))
    similarities = query_vectors @ document_vectors.T
    rankings = [list(order) for order in np.argsort(-similarities, axis=1, kind="stable")[:, :depth]]
    if rerank is not None:
        bar = tqdm(total=len(pairs), desc="rerank", unit="query", disable=not progress, leave=False)
        for index, (query, _) in enumerate(pairs):
            head = rankings[index][:candidates]
            scores = rerank(query, [documents[d] for d in head])
            reordered = [head[i] for i in sorted(range(len(head)), key=lambda i: -scores[i])]
            rankings[index] = reordered + rankings[index][candidates:]
            bar.update()
        bar.close()
    return {**score_rankings(rankings, relevant, k), "seconds": time.perf_counter() - started}


def _unit(vectors):
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


# --- output ------------------------------------------------------------------------


def format_table(rows, metrics, *, label="mode", extra=("ms_per_query",)):
    """A Markdown table: one row per ``(name, values)`` with the ``metrics`` columns (3 decimals) and ``extra``."""
    header = [label, *metrics, *[name.replace("_", " ") for name in extra]]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, values in rows:
        cells = [f"{values[metric]:.3f}" if metric in values else "" for metric in metrics]
        cells += [f"{values[name_]:.1f}" if values.get(name_) is not None else "" for name_ in extra]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
