"""
Search by chunk: each row ranked by its best-matching chunk, in one statement.

The statement walks the chunk table's vector index (or scans it exactly),
keeps the best chunk of each owner and joins the rows::

    SELECT <the row QuerySet's columns>, best.distance, ...
    FROM <row table> ...
    INNER JOIN (
        SELECT DISTINCT ON (owner_id) owner_id, id, distance, index, text, start, "end"
        FROM (SELECT owner_id, id, index, text, start, "end", embedding <=> %s AS distance
              FROM <chunk table>
              WHERE owner_id IN (<the row QuerySet's filters, as a subquery of primary keys>)
              ORDER BY distance LIMIT <n>) AS scanned
        ORDER BY owner_id, distance, index
    ) AS semantic_best ON semantic_best.owner_id = <row table>.<pk>
    WHERE <the row QuerySet's filters> ORDER BY semantic_best.distance LIMIT k

The derived table is added by the compiler (semantic.retrieval.sql), from the
QuerySet as it is when it runs: filters added after the search restrict the
chunk scan too, so a filtered search still finds its k rows. The inner scan
takes ``n = k * CHUNKS_PER_RESULT`` chunks (all of them when the search is not
sliced); through the index, iterative scans keep walking until n chunks pass
the filters. A row whose several chunks are all near the query takes several
of those places: when fewer than k rows come back the search runs once more
without the bound (``unbounded``), which is exact about what exists.

The ORM cannot put a subquery in FROM, so that part is SQL: a fixed shape per
chunk model, with the row filters compiled by the ORM into it.
"""

from django.db.models import ExpressionWrapper, FloatField, IntegerField, TextField
from django.db.models.expressions import Expression
from django.db.models.sql.query import Query
from django.db.models.sql.where import WhereNode

BEST = "semantic_best"
# Chunks taken from the scan per row wanted: a row with several close chunks
# takes several places, so take more than k.
CHUNKS_PER_RESULT = 5
# Columns of the chunk table the derived table carries, and their output fields.
# (Field instances made once: a search builds several of these columns.)
CHUNK_COLUMNS = {
    "id": IntegerField(),
    "distance": FloatField(),
    "index": IntegerField(),
    "text": TextField(),
    "start": IntegerField(),
    "end": IntegerField(),
}


class SearchColumn(ExpressionWrapper):
    """A value the search computes (distance, score, best chunk), not a column of the rows.

    Its SQL is the wrapped expression's. Marked so that the filters on it
    can be told apart from filters on the rows (see ``row_filters``).
    """


class BestChunkColumn(Expression):
    """A column of the derived table of best chunks (``semantic_best.<name>``)."""

    def __init__(self, name, output_field=None):
        super().__init__(output_field=output_field or CHUNK_COLUMNS[name])
        self.name = name

    def as_sql(self, compiler, connection):
        quote = compiler.quote_name_unless_alias
        return f"{quote(BEST)}.{quote(self.name)}", []

    def get_group_by_cols(self):
        return [self]

    @property
    def identity(self):
        return (type(self), self.name)

    def __eq__(self, other):
        return isinstance(other, BestChunkColumn) and other.name == self.name

    def __hash__(self):
        return hash((type(self), self.name))


def best_column(name):
    return SearchColumn(BestChunkColumn(name), output_field=CHUNK_COLUMNS[name])


def refers_to_search(node):
    """Whether a WHERE node or expression uses a value the search computes."""
    if isinstance(node, (SearchColumn, BestChunkColumn)):
        return True
    if isinstance(node, WhereNode):
        return any(refers_to_search(child) for child in node.children)
    children = []
    for side in ("lhs", "rhs"):
        part = getattr(node, side, None)
        if hasattr(part, "resolve_expression"):
            children.append(part)
    if hasattr(node, "get_source_expressions"):
        children.extend(child for child in node.get_source_expressions() if child is not None)
    return any(refers_to_search(child) for child in children)


def row_filters(query):
    """A plain Query of ``query``'s rows: its filters, without the search.

    Conditions on what the search computes (``distance``, ``score``: a
    ``min_score``, say) are left out: they only ever remove the farthest
    rows. Returns the primary keys, unordered and unsliced.
    """
    rows = query.clone()
    rows.__class__ = Query
    for name in ("chunk_search", "search_shape", "search_literal"):
        rows.__dict__.pop(name, None)
    where = WhereNode(connector=rows.where.connector, negated=rows.where.negated)
    if rows.where.connector == "AND" and not rows.where.negated:
        where.children = [child for child in rows.where.children if not refers_to_search(child)]
    elif not refers_to_search(rows.where):
        where.children = list(rows.where.children)
    rows.where = where
    rows.annotations = {name: value for name, value in rows.annotations.items() if not refers_to_search(value)}
    rows.clear_ordering(force=True)
    rows.clear_limits()
    rows.explain_info = None
    # A subquery takes no row locks; the outer query keeps them.
    rows.select_for_update = False
    rows.clear_select_clause()
    rows.select_related = False
    rows.add_fields([rows.model._meta.pk.name], allow_m2m=False)
    return rows


class ChunkSearch:
    """What a search by chunk scans: its chunk model, the table of the slot searched, metric and query vector.

    ``table`` is the chunk model's own table, or a next slot's of the same
    columns (semantic.slots); the model reads the rows of either.
    """

    def __init__(self, chunk_model, metric, vector_literal, unbounded=False, table=None):
        self.chunk_model = chunk_model
        self.metric = metric
        self.vector_literal = vector_literal
        self.unbounded = unbounded
        self.table = table or chunk_model._meta.db_table

    def without_bound(self):
        """The same search, its chunk scan not bounded by k (see the module docstring)."""
        return ChunkSearch(self.chunk_model, self.metric, self.vector_literal, unbounded=True, table=self.table)

    def scan_limit(self, query):
        if self.unbounded or query.high_mark is None:
            return None
        return query.high_mark * CHUNKS_PER_RESULT

    def sql(self, compiler):
        """The derived table of best chunks, for the query ``compiler`` compiles."""
        rows = row_filters(compiler.query)
        rows_sql, rows_params = rows.get_compiler(connection=compiler.connection, using=compiler.using).as_sql()
        quote = compiler.connection.ops.quote_name
        meta = self.chunk_model._meta
        column = {name: quote(meta.get_field(name).column) for name in ("owner", "index", "text", "start", "end", "embedding")}
        pk = quote(meta.pk.column)
        limit = self.scan_limit(compiler.query)
        scanned = (
            f"SELECT {column['owner']} AS owner_id, {pk} AS id, {column['index']} AS {quote('index')}, "
            f"{column['text']} AS text, {column['start']} AS start, {column['end']} AS {quote('end')}, "
            f"({column['embedding']} {self.metric.operator} %s) AS distance "
            f"FROM {quote(self.table)} WHERE {column['owner']} IN ({rows_sql}) "
            f"ORDER BY distance" + (f" LIMIT {int(limit)}" if limit is not None else "")
        )
        best = (
            f"SELECT DISTINCT ON (owner_id) owner_id, id, distance, {quote('index')}, text, start, {quote('end')} "
            f"FROM ({scanned}) AS scanned ORDER BY owner_id, distance, {quote('index')}"
        )
        return best, [self.vector_literal, *rows_params]

    def join(self, compiler):
        """The FROM clause's join of the best chunks to the rows, for ``compiler``."""
        best_sql, best_params = self.sql(compiler)
        quote = compiler.quote_name_unless_alias
        owner = f"{quote(compiler.query.get_initial_alias())}.{quote(compiler.query.model._meta.pk.column)}"
        return f"INNER JOIN ({best_sql}) {quote(BEST)} ON ({quote(BEST)}.owner_id = {owner})", best_params


def attach_best_chunks(rows, chunk_model, using):
    """Give each fetched instance its best chunk (``row.best_chunk``) from the columns fetched with it."""
    fetched = {"id": None, "owner_id": None, "index": None, "start": None, "end": None, "text": None}
    # from_db takes the values in the model's field order.
    names = [f.attname for f in chunk_model._meta.concrete_fields if f.attname in fetched]
    for row in rows:
        fetched["id"] = row.best_chunk_id
        fetched["owner_id"] = row.pk
        for name in BEST_CHUNK_FIELDS:
            fetched[name] = row.__dict__.pop(f"_best_chunk_{name}", None)
        row.best_chunk = None if fetched["id"] is None else chunk_model.from_db(using, names, [fetched[name] for name in names])


BEST_CHUNK_FIELDS = ("index", "text", "start", "end")
# Added when instances are fetched (not part of values()).
BEST_CHUNK_ANNOTATIONS = frozenset(f"_best_chunk_{name}" for name in BEST_CHUNK_FIELDS)


def add_best_chunk_columns(query):
    """Fetch the best chunk's columns with each instance (see attach_best_chunks).

    The columns need no resolving (they name the derived table): the same
    expressions serve every query, added without the cost of add_annotation.
    """
    for name, column in _BEST_CHUNK_COLUMNS.items():
        query.annotations[name] = column
    if query.annotation_select_mask is not None:
        query.append_annotation_mask(_BEST_CHUNK_COLUMNS)


_BEST_CHUNK_COLUMNS = {f"_best_chunk_{name}": BestChunkColumn(name) for name in BEST_CHUNK_FIELDS}
