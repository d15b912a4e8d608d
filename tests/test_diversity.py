"""
Collapse and maximal marginal relevance as pure functions (semantic.retrieval.diversity),
against their definitions and a straightforward reference implementation,
and the validation of ``collapse=`` / ``diversity=``. No services needed.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from semantic.retrieval.diversity import (
    SIMILARITY_TOLERANCE,
    collapse,
    cosine_similarities,
    mmr,
    rescale,
    select,
)
from semantic.retrieval.options import DiversityOptions

DIMENSIONS = 6
fast = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def candidates(draw, min_size=1, max_size=25):
    """(vectors, relevance) of n candidates, with deliberate exact and near copies among them."""
    n = draw(st.integers(min_size, max_size))
    elements = st.floats(-1, 1, allow_nan=False, width=32)
    vectors = draw(arrays(np.float32, (n, DIMENSIONS), elements=elements))
    for i in range(1, n):
        copy_of = draw(st.integers(-1, i - 1))
        if copy_of >= 0 and draw(st.booleans()):
            noise = draw(st.sampled_from([0.0, 1e-4, 1e-2]))
            vectors[i] = vectors[copy_of] + noise * vectors[(i + 1) % n]
    # Scores on a grid: ties happen (as in real rankings), and rescaling
    # cannot merge two different scores by rounding.
    relevance = np.array(draw(st.lists(st.integers(-500, 500), min_size=n, max_size=n)), dtype=np.float64) / 100
    return vectors, relevance


def reference_cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def reference_mmr(vectors, relevance, k, diversity):
    """MMR as written in the literature, one candidate and one pair at a time."""
    low, high = min(relevance), max(relevance)
    rel = [(r - low) / (high - low) if high > low else 1.0 for r in relevance]
    picked = []
    while len(picked) < min(k, len(vectors)):
        best, best_score = None, -math.inf
        for i in range(len(vectors)):
            if i in picked:
                continue
            penalty = max((reference_cosine(vectors[i], vectors[j]) for j in picked), default=0.0)
            score = (1 - diversity) * rel[i] - diversity * penalty
            if score > best_score:
                best, best_score = i, score
        picked.append(best)
    return picked


# --- collapse -------------------------------------------------------------------


@fast
@given(candidates(), st.floats(0.05, 1.0))
def test_collapse_keeps_the_first_and_no_two_alike(data, threshold):
    vectors, _ = data
    kept = collapse(vectors, threshold)
    assert kept[0] == 0
    assert kept == sorted(set(kept))
    sims = cosine_similarities(vectors)
    for a in kept:
        for b in kept:
            if a < b:
                assert sims[a, b] < threshold - SIMILARITY_TOLERANCE


@fast
@given(candidates(), st.floats(0.05, 1.0))
def test_collapse_drops_only_what_a_kept_better_one_covers(data, threshold):
    vectors, _ = data
    kept = collapse(vectors, threshold)
    for i in set(range(len(vectors))) - set(kept):
        assert any(j < i and reference_cosine(vectors[i], vectors[j]) >= threshold - 2 * SIMILARITY_TOLERANCE for j in kept)


@fast
@given(candidates(min_size=2))
def test_collapse_keeps_everything_below_the_threshold(data):
    vectors, _ = data
    sims = cosine_similarities(vectors)
    highest = sims[~np.eye(len(vectors), dtype=bool)].max()
    assume(highest < 0.99)
    assert collapse(vectors, float(highest) + 0.005) == list(range(len(vectors)))


def test_collapse_at_one_drops_exact_copies_only():
    base = np.array([[1, 2, 3, 4]], dtype=np.float32)
    vectors = np.concatenate([base, base * 3, base + np.float32([0, 0, 0, 0.05]), [[4, 3, 2, 1]]])
    assert collapse(vectors, 1.0) == [0, 2, 3]  # a scaled copy points the same way
    assert collapse(vectors, 0.95) == [0, 3]


def test_identical_vectors_reach_a_threshold_of_one_despite_rounding():
    """A copy's computed cosine can round to just under 1: it still collapses at 1.

    Which vectors round short depends on the BLAS numpy uses (74 of these
    200 with numpy 2.4's OpenBLAS, none of the first one): many are tried.
    """
    rng = np.random.default_rng(1)
    for _ in range(200):
        vector = rng.normal(size=384).astype(np.float32)
        assert collapse(np.stack([vector, vector]), 1.0) == [0]


# --- MMR ----------------------------------------------------------------------------


@fast
@given(candidates(), st.integers(1, 30))
def test_mmr_without_diversity_is_the_ranking_by_relevance(data, k):
    vectors, relevance = data
    expected = sorted(range(len(relevance)), key=lambda i: (-relevance[i], i))[:k]
    assert mmr(vectors, relevance, k, 0.0) == expected


@fast
@given(candidates(), st.integers(1, 30), st.floats(0, 1))
def test_mmr_returns_min_k_n_distinct_candidates(data, k, diversity):
    vectors, relevance = data
    picked = mmr(vectors, relevance, k, diversity)
    assert len(picked) == min(k, len(vectors))
    assert len(set(picked)) == len(picked)
    assert all(0 <= i < len(vectors) for i in picked)


@fast
@given(candidates(), st.integers(1, 30), st.floats(0, 1))
def test_each_mmr_pick_maximises_the_marginal_relevance(data, k, diversity):
    # Checked against the objective computed one pair at a time: ties may
    # be broken either way by rounding, so the pick must be a maximum
    # (within float error), not a particular one.
    vectors, relevance = data
    picked = mmr(vectors, relevance, k, diversity)
    low, high = relevance.min(), relevance.max()
    rel = [(r - low) / (high - low) if high > low else 1.0 for r in relevance]

    def objective(i, before):
        penalty = max((reference_cosine(vectors[i], vectors[j]) for j in before), default=0.0)
        return (1 - diversity) * rel[i] - diversity * penalty

    for step, chosen in enumerate(picked):
        before = picked[:step]
        best = max(objective(i, before) for i in range(len(vectors)) if i not in before)
        assert objective(chosen, before) >= best - 1e-9


@pytest.mark.parametrize("seed", range(40))
def test_mmr_equals_the_reference_implementation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    relevance = rng.normal(size=n)
    k = int(rng.integers(1, 45))
    diversity = float(rng.choice([0.1, 0.3, 0.5, 0.7, 1.0]))
    assert mmr(vectors, relevance, k, diversity) == reference_mmr(vectors, relevance, k, diversity)


def test_high_diversity_picks_the_orthogonal_vector_over_a_near_duplicate():
    vectors = np.array([[1, 0, 0], [0.999, 0.04, 0], [0, 0, 1]], dtype=np.float32)
    relevance = [0.9, 0.89, 0.6]
    assert mmr(vectors, relevance, 3, 0.0) == [0, 1, 2]
    assert mmr(vectors, relevance, 3, 0.7) == [0, 2, 1]


def test_rescale_maps_any_scale_onto_unit_interval():
    assert rescale([0.016, 0.033, 0.02]).tolist() == pytest.approx([0.0, 1.0, 4 / 17])
    assert rescale([2.0, 2.0]).tolist() == [1.0, 1.0]
    # A pair the cross-encoder could not score is -inf: it ranks last.
    assert rescale([3.0, -math.inf, 1.0, math.nan]).tolist() == [1.0, 0.0, 0.0, 0.0]


# --- both in one pass -------------------------------------------------------------


@fast
@given(candidates(), st.integers(1, 30), st.floats(0.3, 1.0), st.sampled_from([None, 0.0, 0.2, 0.8]))
def test_select_is_mmr_over_the_collapsed_candidates(data, k, threshold, diversity):
    vectors, relevance = data
    kept = collapse(vectors, threshold)
    chosen = select(vectors, relevance, k, collapse_threshold=threshold, diversity=diversity)
    if diversity:
        expected = [kept[i] for i in mmr(vectors[kept], relevance[kept], k, diversity)]
    else:
        expected = kept[:k]
    assert chosen == expected


def test_select_with_nothing_asked_is_the_candidates_order():
    vectors = np.eye(4, dtype=np.float32)
    assert select(vectors, [0.1, 0.9, 0.5, 0.3], 3) == [0, 1, 2]
    assert select(np.zeros((0, 4), dtype=np.float32), [], 3) == []


# --- validation -----------------------------------------------------------------------


def test_options_off_by_default_and_resolved():
    assert DiversityOptions.from_args() is None
    assert DiversityOptions.from_args(collapse=False, diversity=0) is None
    assert DiversityOptions.from_args(collapse=True) == DiversityOptions(collapse=0.95)
    assert DiversityOptions.from_args(collapse=1, diversity=np.float32(0.5)) == DiversityOptions(1.0, 0.5)
    assert DiversityOptions(0.9).pool(5) == 50
    assert DiversityOptions(0.9).pool(80) == 80
    assert DiversityOptions(0.9).pool(5, candidates=20) == 20


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, math.nan, math.inf, "0.9", [0.9]])
def test_bad_collapse_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"collapse must be None, False, True \(SEMANTIC\['COLLAPSE_THRESHOLD'\]\)"):
        DiversityOptions.from_args(collapse=value)


@pytest.mark.parametrize("value", [True, False, -0.2, 1.01, math.nan, "high"])
def test_bad_diversity_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"diversity must be None, 0 \(off\) or a number in \[0, 1\]"):
        DiversityOptions.from_args(diversity=value)


def test_a_bad_collapse_setting_is_named_when_used(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "COLLAPSE_THRESHOLD": 1.2}
    with pytest.raises(ValueError, match=r"SEMANTIC\['COLLAPSE_THRESHOLD'\]"):
        DiversityOptions.from_args(collapse=True)
    assert DiversityOptions.from_args(collapse=0.9) == DiversityOptions(0.9)


@pytest.mark.parametrize(
    ("name", "value"),
    [("COLLAPSE_THRESHOLD", 0), ("COLLAPSE_THRESHOLD", 1.5), ("COLLAPSE_THRESHOLD", "0.9"), ("DIVERSITY_CANDIDATES", 0)],
)
def test_settings_check_reports_bad_values(settings, name, value):
    from semantic.checks import check_settings

    assert not [e for e in check_settings() if name in e.msg]
    settings.SEMANTIC = {**settings.SEMANTIC, name: value}
    errors = [e for e in check_settings() if name in e.msg]
    assert [e.id for e in errors] == ["semantic.E010"]
