"""
The session a search runs in: its planner and index settings, for its own query only.

``set_config(name, value, true)`` is ``SET LOCAL``: it lasts until the end of
the transaction. Outside a transaction one is opened for the query; inside
one, a savepoint is rolled back afterwards (the search only read), which
undoes the settings without touching the caller's work.

That costs three round trips more than the query itself (begin, set, commit),
as much as a fast index search takes in PostgreSQL. So each connection's own
values of these settings are read once, and a search whose settings the
session already has runs as it is. ``connection_options()`` gives the
``-c`` options that make a connection start with the index defaults, for
``DATABASES[...]["OPTIONS"]["options"]``: then a common search costs one round
trip. (A ``SET`` run on the connection outside semantic after its first
search is not seen.)
"""

from contextlib import contextmanager

from django.db import connections, transaction

from semantic.conf import semantic_settings

# Every setting a search may apply (semantic.retrieval.options).
SEARCH_SETTINGS = ("enable_indexscan", "enable_seqscan", "hnsw.ef_search", "hnsw.iterative_scan", "ivfflat.iterative_scan", "ivfflat.probes")


def set_local(connection, values):
    """Apply ``values`` ({name: value}) with SET LOCAL, in one round trip."""
    if not values:
        return
    selects = ", ".join(["set_config(%s, %s, true)"] * len(values))
    params = [str(part) for name, value in values.items() for part in (name, value)]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {selects}", params)


def session_values(connection):
    """This connection's own values of SEARCH_SETTINGS, read once per database connection."""
    raw = connection.connection
    known = getattr(connection, "_semantic_session", None)
    if known is None or known[0] is not raw:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT " + ", ".join(["current_setting(%s, true)"] * len(SEARCH_SETTINGS)), list(SEARCH_SETTINGS)
            )
            known = (connection.connection, dict(zip(SEARCH_SETTINGS, cursor.fetchone())))
        connection._semantic_session = known
    return known[1]


def session_has(connection, values):
    """Whether the connection's session already runs with ``values``."""
    if connection.connection is None:
        connection.ensure_connection()
    current = session_values(connection)
    return all(current.get(name) == str(value) for name, value in values.items())


@contextmanager
def search_settings(using, values, *, keeps_locks=False):
    """Run the block with ``values`` applied to database ``using``, and nothing after it.

    ``keeps_locks``: the block locks rows (``select_for_update``), so the
    savepoint is released rather than rolled back, which would unlock them;
    the settings then last until the caller's transaction ends.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or not values or session_has(connection, values):
        yield
        return
    if not connection.in_atomic_block:
        with transaction.atomic(using=using):
            set_local(connection, values)
            yield
        return
    savepoint = transaction.savepoint(using=using)
    try:
        set_local(connection, values)
        yield
    finally:
        if keeps_locks:
            transaction.savepoint_commit(savepoint, using=using)
        else:
            transaction.savepoint_rollback(savepoint, using=using)


def connection_options():
    """``-c`` options that start a connection with the index settings of a default search.

    Put them in ``DATABASES["default"]["OPTIONS"]["options"]``; with them, a
    search with default options and k at most EF_SEARCH needs no SET LOCAL
    (nor its transaction). Only vector index scans read these settings.
    """
    mode = semantic_settings.ITERATIVE_SCAN
    values = {"hnsw.iterative_scan": mode, "ivfflat.iterative_scan": "off" if mode == "off" else "relaxed_order"}
    if semantic_settings.EF_SEARCH:
        values["hnsw.ef_search"] = int(semantic_settings.EF_SEARCH)
    if semantic_settings.PROBES:
        values["ivfflat.probes"] = int(semantic_settings.PROBES)
    return " ".join(f"-c {name}={value}" for name, value in values.items())
