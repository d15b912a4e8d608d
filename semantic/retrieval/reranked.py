"""
Two-stage search: the vector search's candidates, ordered by the configured cross-encoder.
"""

from semantic.conf import semantic_settings
from semantic.rerank import get_reranker
from semantic.retrieval.pinned import pinned


def reranked(queryset, by_vector, query, field, *, k):
    """The top ``k`` of ``by_vector`` (a search of ``queryset``'s rows) by cross-encoder score.

    A chunked row is judged by its best passage: cross-encoders read a few
    hundred tokens, not a whole document.
    """
    reranker = get_reranker()
    rows = list(by_vector)
    texts = [row.best_chunk.text if getattr(row, "best_chunk", None) else field.build_text(row) for row in rows]
    scores = reranker.score(query, texts) if rows else []
    order = sorted(range(len(rows)), key=lambda i: -scores[i])[:k]
    ranked = [
        (rows[i].pk, {"rerank_score": float(scores[i]), "distance": rows[i].distance, "score": rows[i].score})
        for i in order
    ]
    return pinned(queryset, ranked, "-rerank_score", rows={row.pk: row for row in rows})


def rerank_candidates(k, candidates):
    """How many rows the vector search hands the cross-encoder: at least k."""
    return max(int(candidates or semantic_settings.RERANK_CANDIDATES), k)
