"""
Query vectors: the embedding of a query text, and the checks on a vector given directly.
"""

from collections import OrderedDict

import numpy as np

from semantic import cache as embedding_cache
from semantic.hashing import clean_text

# Query embeddings seen recently by this process: a repeated query costs no
# model call and no cache round trip. Keys carry the encoder fingerprint.
_QUERY_VECTORS = OrderedDict()
QUERY_VECTORS_IN_PROCESS = 1024


def embed_query(field, query):
    """The query's embedding under ``field``'s encoder (a field's declared one, or a slot's: semantic.slots).

    Looked up in this process's recent queries, then in the query vectors'
    cache (semantic.cache, its own short-lived key space), and only then
    encoded (with the model's query prefix).
    """
    encoder = field.encoder
    text = clean_text(query)
    key = encoder.text_hash(text, query=True)
    vector = _QUERY_VECTORS.get(key)
    if vector is None:
        vector = embedding_cache.get_vectors([key], dimensions=field.dimensions, queries=True).get(key)
    if vector is None:
        field.verify_encoder()
        vectors, failures = encoder.encode([text], query=True)
        if failures:
            raise RuntimeError(f"The query could not be encoded: {failures[0]}.")
        vector = vectors[0]
        embedding_cache.set_vectors({key: vector}, queries=True)
    _QUERY_VECTORS[key] = vector
    _QUERY_VECTORS.move_to_end(key)
    while len(_QUERY_VECTORS) > QUERY_VECTORS_IN_PROCESS:
        _QUERY_VECTORS.popitem(last=False)
    return vector


def forget_query_vectors():
    """Empty this process's recent query vectors (benchmarks, tests)."""
    _QUERY_VECTORS.clear()


def as_query_vector(vector, slot):
    """``vector`` as a 1-d float32 array of ``slot``'s dimensions (semantic.slots); ValueError otherwise."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or (slot.dimensions and array.shape[0] != slot.dimensions):
        raise ValueError(
            f"{slot.field.model.__name__}.{slot.field.name} holds {slot.dimensions}-dimensional vectors"
            f"{' (its next slot, promoted)' if slot.is_next else ''}; the query vector has shape {array.shape}."
        )
    if not np.isfinite(array).all():
        raise ValueError("The query vector holds NaN or infinite values.")
    return array
