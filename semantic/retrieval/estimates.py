"""
What a search would scan, as the planner estimates it: the input of the automatic exact/index choice.

An exact search compares every vector its filters leave: the filtered rows
for a row-vector search, their chunks for a search by chunk; an index walk
costs more the smaller the share of the table the filters keep. The row count
comes from the planner (``EXPLAIN`` of the filtered rows, one round trip) or,
for an unfiltered search, from the table's statistics (``pg_class``, cached
for a minute per process: no round trip on the common call).
"""

import json
import time

from django.core.exceptions import EmptyResultSet
from django.db import connections

STATISTICS_TTL = 60.0
_table_rows = {}


def table_rows(using, table):
    """The planner's row count of ``table`` (a name, or a model's table; cached per process for STATISTICS_TTL s)."""
    if not isinstance(table, str):
        table = table._meta.db_table
    key = (using, table)
    cached = _table_rows.get(key)
    now = time.monotonic()
    if cached is not None and now - cached[1] < STATISTICS_TTL:
        return cached[0]
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", [connections[using].ops.quote_name(table)])
        found = cursor.fetchone()
    rows = found[0] if found else -1
    if rows is None or rows < 0:
        # Never analysed (reltuples -1): the planner estimates from the pages.
        rows = _planned(using, f"SELECT 1 FROM {connections[using].ops.quote_name(table)}", [])
    _table_rows[key] = (float(rows), now)
    return float(rows)


def forget_table_statistics():
    """Drop the cached table row counts (after loading data in tests and benchmarks)."""
    _table_rows.clear()


def planned_rows(using, query):
    """The planner's estimate of the rows ``query`` (a Query) returns (0 for one Django knows matches nothing)."""
    try:
        sql, params = query.get_compiler(using=using).as_sql()
    except EmptyResultSet:  # .none(), pk__in=[]
        return 0.0
    return _planned(using, sql, params)


def _planned(using, sql, params):
    with connections[using].cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def scan_estimate(rows, using, model, chunk_table=None):
    """(vectors an exact search over ``rows`` filtered rows compares, the share of the table they are).

    For a search by chunk (the rows' chunks in ``chunk_table``) the vectors
    are the rows' chunks: the rows times the table's mean chunks per row.
    """
    table = table_rows(using, model)
    share = min(1.0, rows / table) if table >= 1 else 1.0
    if chunk_table is None:
        return rows, share
    chunks = table_rows(using, chunk_table)
    return rows * (chunks / table if table >= 1 else 1.0), share
