"""
How a vector search finds its rows: one validated object for the index options.

``exact``, ``ef_search``, ``probes``, ``iterative_scan`` and ``by_chunk`` are
accepted by every search method (``nearest``, ``semantic_search``,
``similar_to``, ``hybrid_search``); they are checked once, here, and carried
by the QuerySet's clones. ``collapse`` and ``diversity`` (what is done to the
top candidates once found) are checked here too, as ``DiversityOptions``.
"""

import math
import numbers
import re
from dataclasses import dataclass, fields

from semantic.conf import semantic_settings

# pgvector's defaults and limits: hnsw.ef_search is 40 unless set and at most
# 1000; an index scan returns at most ef_search rows without iterative scans.
DEFAULT_EF_SEARCH = 40
MAX_INDEX_LIMIT = 1000
ITERATIVE_SCAN_MODES = ("relaxed_order", "strict_order", "off")
EXACT = {"enable_indexscan": "off"}


def _positive_int(name, value, upper=None):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper and value > upper):
        bound = f" at most {upper}" if upper else ""
        raise ValueError(f"{name} must be a positive integer{bound}, not {value!r}.")


@dataclass(frozen=True)
class SearchOptions:
    """Index options of one search; ``None`` means "the setting's default".

    * ``exact``: True scans exactly, False walks the vector index, None
      chooses per query (see ``index_settings``).
    * ``ef_search`` (HNSW, default SEMANTIC["EF_SEARCH"] or pgvector's 40,
      raised to k when k is larger), ``probes`` (IVFFlat, default
      SEMANTIC["PROBES"]), ``iterative_scan`` ("relaxed_order",
      "strict_order", "off"; default SEMANTIC["ITERATIVE_SCAN"]).
    * ``by_chunk``: rank a chunked field's rows by their best chunk
      (default True for fields with ``chunks=True``).

    Raises ValueError for a value out of range, TypeError for an unknown name
    (``from_kwargs``).
    """

    exact: bool | None = None
    ef_search: int | None = None
    probes: int | None = None
    iterative_scan: str | None = None
    by_chunk: bool | None = None

    def __post_init__(self):
        for name in ("exact", "by_chunk"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise ValueError(f"{name} must be True, False or None, not {getattr(self, name)!r}.")
        _positive_int("ef_search", self.ef_search, MAX_INDEX_LIMIT)
        _positive_int("probes", self.probes)
        if self.iterative_scan is not None and self.iterative_scan not in ITERATIVE_SCAN_MODES:
            raise ValueError(
                f"iterative_scan must be one of {', '.join(ITERATIVE_SCAN_MODES)}, not {self.iterative_scan!r}."
            )

    @classmethod
    def from_kwargs(cls, **options):
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Unknown search option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}.")
        return cls(**options)

    def index_settings(self, limit, estimate_scan, scan_rows=None):
        """The planner and index settings of a search returning at most ``limit`` rows.

        ``scan_rows``: how many vectors an index scan must yield for those
        rows (``limit``, or more for a search by chunk); ``ef_search`` is
        raised to it. With ``exact`` None the search is exact when it is not
        sliced, when ``limit`` exceeds what an index scan can return, or
        when an exact scan is estimated to cost less than the index walk.
        ``estimate_scan()`` (asked only then) returns the vectors an exact
        scan would compare (the filtered rows, or their chunks) and the share
        of the table the filters keep. The index walk costs about
        SEMANTIC["EXACT_SEARCH_THRESHOLD"] vector comparisons while it needs
        no more than ef_search candidates; a filter keeping a share s of the
        rows makes it walk scan_rows / s candidates instead, and its cost
        grows with them. ``{"enable_indexscan": "off"}`` means an exact scan.
        """
        scan_rows = limit if scan_rows is None else scan_rows
        ef_search = self.ef_search or semantic_settings.EF_SEARCH or DEFAULT_EF_SEARCH
        if scan_rows is not None:
            ef_search = max(ef_search, scan_rows)
        ef_search = min(int(ef_search), MAX_INDEX_LIMIT)
        exact = self.exact
        if exact is None:
            exact = limit is None or limit > MAX_INDEX_LIMIT
            if not exact:
                vectors, share = estimate_scan()
                walked = scan_rows / share if share > 0 else float("inf")
                exact = vectors <= semantic_settings.EXACT_SEARCH_THRESHOLD * max(1.0, walked / ef_search)
        if exact:
            # HNSW and IVFFlat only offer ordered index scans; without them
            # the planner filters (bitmap scans on other indexes still work)
            # and sorts by the exact distance.
            return dict(EXACT)
        mode = self.iterative_scan or semantic_settings.ITERATIVE_SCAN
        values = {}
        if self.exact is False:
            # Asked for the index: on a small table the planner would rather
            # sort the whole table. (Chosen automatically, the index is only
            # offered: a plan the planner costs lower is exact, so no worse.
            # A selective filter can still be served by a B-tree bitmap scan.)
            values["enable_seqscan"] = "off"
        values |= {
            "hnsw.ef_search": ef_search,
            "hnsw.iterative_scan": mode,
            # IVFFlat knows no strict order.
            "ivfflat.iterative_scan": "off" if mode == "off" else "relaxed_order",
        }
        probes = self.probes or semantic_settings.PROBES
        if probes:
            values["ivfflat.probes"] = int(probes)
        return values


# Control characters (C0, DEL, C1; NUL among them): tokenizers, PostgreSQL
# text and to_tsquery all choke on some of them, and no query means them.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def clean_query(query):
    """``query`` as every search uses it: each run of control characters one space, outer spaces stripped.

    Raises ValueError unless the result is a non-empty string of at most
    SEMANTIC["QUERY_MAX_CHARS"] characters (a query string is a visitor's
    input: its length is bounded before any model or database sees it).
    """
    if not isinstance(query, str):
        raise ValueError(f"A search query must be a string, not {type(query).__name__}.")
    limit = semantic_settings.QUERY_MAX_CHARS
    if len(query) > 2 * limit:
        # Not even cleaned: the bound holds for the work done on a hostile input too.
        raise ValueError(f"The search query is longer than {limit} characters (SEMANTIC['QUERY_MAX_CHARS']).")
    cleaned = _CONTROL_CHARACTERS.sub(" ", query).strip()
    if not cleaned:
        raise ValueError("A search needs a non-empty query string.")
    if len(cleaned) > limit:
        raise ValueError(f"The search query is longer than {limit} characters (SEMANTIC['QUERY_MAX_CHARS']).")
    return cleaned


def check_k(k):
    """ValueError unless ``k`` is None or a positive integer of at most SEMANTIC["MAX_K"]."""
    _check_count("k", k, "MAX_K")


def check_candidates(candidates):
    """ValueError unless ``candidates`` is None or a positive integer of at most SEMANTIC["MAX_CANDIDATES"]."""
    _check_count("candidates", candidates, "MAX_CANDIDATES")


def _check_count(name, value, setting):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}.")
    limit = getattr(semantic_settings, setting)
    if value > limit:
        raise ValueError(f"{name} must be at most {limit} (SEMANTIC[{setting!r}]), not {value}.")


@dataclass(frozen=True)
class DiversityOptions:
    """What a search does to its top candidates besides ranking them (semantic.retrieval.diversity).

    * ``collapse``: a cosine-similarity threshold in (0, 1]: a result whose
      row vector is at least that similar to a better-ranked kept result is
      dropped. The caller's True means SEMANTIC["COLLAPSE_THRESHOLD"].
    * ``diversity``: the maximal-marginal-relevance weight in (0, 1]
      (0, plain ranking, is stored as None).

    Build it with ``from_args``, which validates what a caller passed.
    """

    collapse: float | None = None
    diversity: float | None = None

    @classmethod
    def from_args(cls, collapse=None, diversity=None):
        """The options of ``collapse=`` and ``diversity=`` as a caller passes them; None when both are off.

        ``collapse``: None or False (off), True (SEMANTIC["COLLAPSE_THRESHOLD"])
        or a number in (0, 1]; ``diversity``: None, 0 (off) or a number in
        (0, 1]. Raises ValueError naming the argument (and the setting) for
        anything else: out of range, NaN, a string, a bool for ``diversity``.
        """
        if collapse is None or collapse is False:
            threshold = None
        elif collapse is True:
            threshold = _fraction(
                "SEMANTIC['COLLAPSE_THRESHOLD'] (what collapse=True uses)", semantic_settings.COLLAPSE_THRESHOLD
            )
        else:
            threshold = _fraction("collapse", collapse, accepted="None, False, True (SEMANTIC['COLLAPSE_THRESHOLD']) or ")
        if diversity is None:
            weight = None
        else:
            weight = _fraction("diversity", diversity, zero=True, accepted="None, 0 (off) or ") or None
        if threshold is None and weight is None:
            return None
        return cls(threshold, weight)

    def pool(self, k, candidates=None):
        """How many of the search's top rows collapse and diversity choose from: at least k.

        ``candidates`` when given, else SEMANTIC["DIVERSITY_CANDIDATES"].
        """
        return max(int(candidates or semantic_settings.DIVERSITY_CANDIDATES), k)


def _fraction(name, value, *, zero=False, accepted=""):
    """``value`` as a float in (0, 1] ([0, 1] with ``zero``); ValueError naming ``name`` otherwise."""
    interval = "[0, 1]" if zero else "(0, 1]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {accepted}a number in {interval}, not {value!r}.")
    number = float(value)
    if math.isnan(number) or not (0.0 <= number <= 1.0) or (number == 0.0 and not zero):
        raise ValueError(f"{name} must be {accepted}a number in {interval}, not {value!r}.")
    return number
