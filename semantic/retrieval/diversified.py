"""
Collapse and diversity over a search's candidates: fetched once with their
row vectors, chosen by semantic.retrieval.diversity, pinned in that order.
"""

import numpy as np
from django.db.models import BinaryField, Func

from semantic.retrieval import diversity
from semantic.retrieval.pinned import RANK, pinned

# What collapse and diversity read of each candidate: its row vector in
# pgvector's binary form (vector_send / halfvec_send: a 16-bit dimension
# count, 16 unused bits, then the values big-endian). Parsing the text form
# of 50 384-dimension vectors in Python costs ~15 ms, more than the search.
ROW_VECTOR = "_row_vector"


def with_row_vectors(queryset, slot):
    """``queryset`` with each row's own vector in ``slot`` (semantic.slots) annotated as ROW_VECTOR, in binary."""
    send = Func(slot.vector(), function=f"{slot.field.storage_type.name}_send", output_field=BinaryField())
    return queryset.annotate(**{ROW_VECTOR: send})


def row_vector(row):
    """The float32 vector of a row fetched through ``with_row_vectors``; the bytes are dropped from the row."""
    data = bytes(row.__dict__.pop(ROW_VECTOR))
    dimensions = int.from_bytes(data[:2], "big")
    width = (len(data) - 4) // dimensions if dimensions else 4
    return np.frombuffer(data, dtype=">f4" if width == 4 else ">f2", offset=4).astype(np.float32)


def diversified(queryset, candidates, spread, k, scores):
    """The top ``k`` of ``candidates`` (a search of ``queryset``'s rows, best first) after collapse and diversity.

    ``spread`` is the validated DiversityOptions. Each candidate carries its
    row vector (``with_row_vectors``); the first of ``scores`` is the
    relevance MMR weighs, and every name in ``scores`` is annotated on the
    result. Returns a pinned QuerySet in the chosen order.
    """
    rows = list(candidates)
    if not rows:
        return queryset.none()
    vectors = np.stack([row_vector(row) for row in rows])
    relevance = [getattr(row, scores[0]) for row in rows]
    chosen = diversity.select(vectors, relevance, k, collapse_threshold=spread.collapse, diversity=spread.diversity)
    ranked = [(rows[i].pk, {name: getattr(rows[i], name) for name in scores}) for i in chosen]
    return pinned(queryset, ranked, RANK, rows={row.pk: row for row in rows})
