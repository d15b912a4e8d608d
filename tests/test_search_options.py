"""The index options of a search: validated once, and the settings they choose (no database)."""

import time

import pytest

from semantic.retrieval.options import EXACT, MAX_INDEX_LIMIT, SearchOptions, check_candidates, check_k, clean_query
from semantic.retrieval.session import connection_options


def never():
    raise AssertionError("the estimate was asked for although the choice did not need it")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"exact": "yes"}, "exact must be True, False or None"),
        ({"by_chunk": 1}, "by_chunk must be True, False or None"),
        ({"ef_search": 0}, "ef_search must be a positive integer at most 1000"),
        ({"ef_search": MAX_INDEX_LIMIT + 1}, "at most 1000"),
        ({"ef_search": True}, "ef_search must be a positive integer"),
        ({"probes": -3}, "probes must be a positive integer"),
        ({"iterative_scan": "fast"}, "iterative_scan must be one of relaxed_order, strict_order, off"),
    ],
)
def test_out_of_range_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SearchOptions.from_kwargs(**options)


def test_unknown_options_name_what_is_accepted():
    with pytest.raises(TypeError, match="Unknown search option.*ef_serach.*accepted: by_chunk, ef_search, exact"):
        SearchOptions.from_kwargs(ef_serach=10)


def test_exact_needs_no_estimate_and_turns_index_scans_off():
    assert SearchOptions(exact=True).index_settings(10, never) == EXACT


def test_asking_for_the_index_forces_it_and_raises_ef_search_to_k(settings):
    values = SearchOptions(exact=False).index_settings(300, never)
    assert values["enable_seqscan"] == "off" and values["hnsw.ef_search"] == 300
    assert SearchOptions(exact=False, ef_search=50).index_settings(10, never)["hnsw.ef_search"] == 50


@pytest.mark.parametrize(
    "vectors, share, scan_rows, exact",
    [
        # Unfiltered: the threshold itself.
        (2000, 1.0, 10, True),
        (2001, 1.0, 10, False),
        # A filter keeping 10%: walking 10 / 0.1 = 100 candidates is what
        # ef_search walks anyway.
        (5000, 0.1, 10, False),
        # A filter keeping 1%: 1,000 candidates, ten times the walk.
        (5000, 0.01, 10, True),
        (20001, 0.01, 10, False),
        # By chunk, 50 chunks for 10 rows: at 10%, 500 candidates.
        (9000, 0.1, 50, True),
        (10001, 0.1, 50, False),
        (1, 0.0, 10, True),
    ],
)
def test_the_automatic_choice_weighs_an_exact_scan_against_the_index_walk(settings, vectors, share, scan_rows, exact):
    settings.SEMANTIC = {**settings.SEMANTIC, "EXACT_SEARCH_THRESHOLD": 2000, "EF_SEARCH": 100}
    values = SearchOptions().index_settings(10, lambda: (vectors, share), scan_rows)
    assert (values == EXACT) is exact
    # Chosen automatically, the index is offered, not forced.
    assert "enable_seqscan" not in values


def test_ef_search_covers_what_the_index_scan_must_yield(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "EF_SEARCH": 100}
    assert SearchOptions(exact=False).index_settings(30, never, 150)["hnsw.ef_search"] == 150
    assert SearchOptions(exact=False).index_settings(300, never, 1500)["hnsw.ef_search"] == MAX_INDEX_LIMIT


@pytest.mark.parametrize("limit", [None, MAX_INDEX_LIMIT + 1])
def test_unsliced_or_huge_searches_are_exact_without_an_estimate(limit):
    assert SearchOptions().index_settings(limit, never) == EXACT


def test_iterative_scan_modes_map_to_ivfflat(settings):
    assert SearchOptions(exact=False, iterative_scan="strict_order").index_settings(10, never)["ivfflat.iterative_scan"] == "relaxed_order"
    assert SearchOptions(exact=False, iterative_scan="off").index_settings(10, never)["ivfflat.iterative_scan"] == "off"


def test_connection_options_start_a_session_with_the_default_search_settings(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "EF_SEARCH": 120, "ITERATIVE_SCAN": "strict_order", "PROBES": 7}
    default = SearchOptions().index_settings(10, lambda: (10**6, 1.0))
    options = dict(part.split("=") for part in connection_options().replace("-c ", "").split())
    assert options == {name: str(value) for name, value in default.items()}


# --- bounds on a visitor's input -------------------------------------------------


@pytest.mark.parametrize(
    "query, cleaned",
    [
        ("phone\x00sales", "phone sales"),
        ("  tabs\tand\nnew\r\nlines ", "tabs and new lines"),
        ("bell\x07 and \x7fdel\x9b", "bell  and  del"),
        ("zero\u200bwidth and émigré", "zero\u200bwidth and émigré"),
    ],
)
def test_control_characters_become_spaces_and_the_rest_is_kept(query, cleaned):
    assert clean_query(query) == cleaned


@pytest.mark.parametrize("query", ["", "   ", "\x00\x00", "\x01\x1f\x7f", None, 42, b"bytes"])
def test_an_empty_or_non_text_query_is_a_clear_error(query):
    with pytest.raises(ValueError, match="query"):
        clean_query(query)


def test_a_query_over_the_limit_is_refused_before_any_work(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "QUERY_MAX_CHARS": 50}
    assert clean_query("x" * 50) == "x" * 50
    with pytest.raises(ValueError, match="longer than 50 characters"):
        clean_query("x" * 51)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="longer than 50 characters"):
        clean_query("x\x00" * 500_000)
    assert time.perf_counter() - start < 0.05


@pytest.mark.parametrize("k", [0, -1, 2**63, 1001, 1.5, "10", True])
def test_k_outside_one_to_max_k_is_a_clear_error(k):
    with pytest.raises(ValueError, match="k must be"):
        check_k(k)


def test_max_k_and_max_candidates_are_settings(settings):
    check_k(1000)
    check_candidates(1000)
    settings.SEMANTIC = {**settings.SEMANTIC, "MAX_K": 20, "MAX_CANDIDATES": 30}
    check_k(20)
    check_candidates(30)
    with pytest.raises(ValueError, match=r"at most 20 \(SEMANTIC\['MAX_K'\]\)"):
        check_k(21)
    with pytest.raises(ValueError, match=r"at most 30 \(SEMANTIC\['MAX_CANDIDATES'\]\)"):
        check_candidates(31)
    with pytest.raises(ValueError, match="candidates must be a positive integer"):
        check_candidates(0)
