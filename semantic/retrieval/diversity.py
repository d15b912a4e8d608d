"""
Results without near-duplicates, and with diversity: pure functions over candidate vectors.

A search's top candidates come in best first, as an (n, d) array of their
vectors and a length-n array of relevance (the search's own score, higher
is better). Both steps return indices into the candidates, in the order to
show them:

* ``collapse``: a candidate is dropped when its cosine similarity with a
  better candidate that was kept reaches the threshold (greedy, in rank
  order, so of a group of copies the best-ranked one stays);
* ``mmr``: maximal marginal relevance (Carbonell and Goldstein, 1998), as
  LangChain's ``max_marginal_relevance_search`` and Qdrant's MMR query
  compute it: each step picks the candidate maximising
  ``(1 - diversity) * relevance - diversity * max cos(candidate, picked)``.

``select`` runs both, collapse first. numpy only: no Django, no database
(semantic.querysets fetches the candidates and pins the result).
"""

import numpy as np

# Candidate vectors are float32: identical vectors can compute to a cosine
# of 0.9999999, which must still reach a threshold of 1.0.
SIMILARITY_TOLERANCE = 1e-6


def cosine_similarities(vectors):
    """The (n, n) matrix of cosine similarities of ``vectors`` (an (n, d) array), in float64.

    A zero vector has similarity 0 with everything, itself included.
    """
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"vectors must be an (n, d) array, not of shape {matrix.shape}.")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return unit @ unit.T


def rescale(relevance):
    """``relevance`` mapped onto [0, 1] by min-max over the candidates, as float64.

    MMR subtracts a cosine similarity from relevance, so relevance needs a
    fixed scale for one ``diversity`` to mean the same in every search: a
    vector score, a cross-encoder logit and a reciprocal-rank-fusion score
    (~0.03) differ by orders of magnitude. All equal: all 1. Not finite:
    +inf is 1, -inf and NaN are 0 (a cross-encoder scores an unreadable
    pair -inf: it ranks last).
    """
    values = np.asarray(relevance, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    scaled = np.where(values == np.inf, 1.0, 0.0)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        scaled[finite] = (values[finite] - low) / (high - low) if high > low else 1.0
    return scaled


def collapse(vectors, threshold, similarities=None):
    """Indices of the candidates kept, in order: each is below ``threshold`` cosine with every earlier kept one.

    The first candidate is always kept. A pair counts as reaching the
    threshold at ``similarity >= threshold - SIMILARITY_TOLERANCE``.
    ``similarities``: the matrix of ``cosine_similarities(vectors)``, when
    already computed.
    """
    sims = cosine_similarities(vectors) if similarities is None else similarities
    kept = []
    for i in range(len(sims)):
        if not kept or sims[i, kept].max() < threshold - SIMILARITY_TOLERANCE:
            kept.append(i)
    return kept


def mmr(vectors, relevance, k, diversity, similarities=None):
    """Indices of ``min(k, n)`` candidates in maximal-marginal-relevance order.

    Step by step, the candidate not yet picked with the highest
    ``(1 - diversity) * rescale(relevance)_i - diversity * max_j cos(v_i, v_j)``
    over the picked j (0 before the first pick); ties go to the better-ranked
    (lower index) candidate. ``diversity`` 0 is the ranking by relevance,
    1 ignores relevance after the first pick. O(k n) after the O(n^2 d)
    similarities.
    """
    sims = cosine_similarities(vectors) if similarities is None else similarities
    n = len(sims)
    if len(np.asarray(relevance).reshape(-1)) != n:
        raise ValueError(f"{n} candidate vectors but {len(relevance)} relevance values.")
    gain = (1.0 - diversity) * rescale(relevance)
    penalty = np.zeros(n)
    available = np.ones(n, dtype=bool)
    picked = []
    for _ in range(min(int(k), n)):
        scores = np.where(available, gain - diversity * penalty, -np.inf)
        best = int(np.argmax(scores))
        # The first pick's similarities replace the zero start: a candidate
        # opposite to it (cosine < 0) is then rewarded, as MMR defines.
        penalty = sims[best].copy() if not picked else np.maximum(penalty, sims[best])
        picked.append(best)
        available[best] = False
    return picked


def select(vectors, relevance, k, *, collapse_threshold=None, diversity=None):
    """Indices of at most ``k`` candidates to show, in order: collapse, then MMR, in one pass.

    ``collapse_threshold`` None keeps near-duplicates; ``diversity`` None or
    0 keeps the candidates' own order (the search's ranking). The
    similarity matrix is computed once for both steps.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n == 0:
        return []
    sims = cosine_similarities(vectors)
    kept = np.asarray(collapse(vectors, collapse_threshold, sims) if collapse_threshold else range(n))
    relevance = np.asarray(relevance, dtype=np.float64).reshape(-1)
    if len(relevance) != n:
        raise ValueError(f"{n} candidate vectors but {len(relevance)} relevance values.")
    relevance = relevance[kept]
    if not diversity:
        return [int(i) for i in kept[: int(k)]]
    order = mmr(None, relevance, k, float(diversity), sims[np.ix_(kept, kept)])
    return [int(kept[i]) for i in order]
