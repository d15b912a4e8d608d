"""
The SQL of a search: the Query class every search QuerySet carries, and its compiler.

Two things a plain Query cannot do:

* a search by chunk joins a derived table of best chunks (semantic.retrieval.chunks);
* compiling a QuerySet costs as much as the query it compiles on a fast
  index scan (measured ~0.4 ms for a 10-row HNSW search that PostgreSQL
  answers in ~3 ms), and the common call, ``Model.objects.nearest(v, k=10)``
  or ``semantic_search(text, k=10)`` with no other filter, compiles to the
  same SQL every time but for the query vector. For those *plain* searches
  the compiled SQL, its parameters and the compiler's column map are kept
  per shape, and only the vector is put in. Anything else about the
  QuerySet (a filter, an annotation, values(), select_related(), ...) makes
  it not plain, and it is compiled as usual. The cache is dropped when
  SEMANTIC changes (its parameters carry settings: fingerprint, attempts).
"""

from django.core.signals import setting_changed
from django.db.models.sql.query import Query

from semantic.conf import SETTING_NAME
from semantic.retrieval.chunks import BEST_CHUNK_ANNOTATIONS

SQL_CACHE_SIZE = 256
_compiled = {}


class SearchQuery(Query):
    """The Query of a search QuerySet (see the module docstring).

    ``search_shape`` (set by semantic.retrieval.nearest.build) describes what
    the search added: the query is *plain* while nothing else was added.
    ``chunk_search`` is the ChunkSearch of a search by chunk, else None.
    """

    chunk_search = None
    search_shape = None
    search_literal = None

    def get_compiler(self, using=None, connection=None, elide_empty=True):
        compiler = super().get_compiler(using, connection, elide_empty)
        compiler.__class__ = search_compiler(type(compiler))
        return compiler

    def is_unfiltered(self):
        """Whether the search runs over every row of its table: built unfiltered, and nothing filtered or joined since."""
        shape = self.search_shape
        return shape is not None and shape.unfiltered and len(self.where.children) == shape.where_size and len(self.alias_map) <= 1

    def plain_key(self, using, with_limits, with_col_aliases):
        """A key for the compiled SQL of this query, or None when it is not a plain search."""
        shape = self.search_shape
        if (
            not self.is_unfiltered()
            or set(self.annotations) - BEST_CHUNK_ANNOTATIONS != shape.annotations
            # values()/values_list() of the table's own columns: the key has them.
            or (self.select or not self.default_cols) and not self.values_select
            or self.select_related
            or self.extra
            or self.extra_tables
            or self.distinct
            or self.select_for_update
            or self.group_by is not None
            or self.combinator
            or self.extra_order_by
            or self.order_by != ("distance",)
            or not self.standard_ordering
            or self.subquery
            or self.explain_info
            or self.is_empty()
        ):
            return None
        mask = self.annotation_select_mask
        return (
            using,
            # The class instances are made of (a proxy shares its concrete model's SQL, not its class).
            self.model,
            shape.key,
            self.low_mark,
            self.high_mark,
            with_limits,
            with_col_aliases,
            self.values_select,
            tuple(self.annotations),
            None if mask is None else tuple(sorted(mask)),
            (frozenset(self.deferred_loading[0]), self.deferred_loading[1]),
            getattr(self.chunk_search, "unbounded", None),
        )


_compilers = {}


def search_compiler(base):
    """``base`` (the backend's SQLCompiler) with the best-chunk join and the plain-search cache."""
    compiler = _compilers.get(base)
    if compiler is not None:
        return compiler

    def get_from_clause(self):
        result, params = base.get_from_clause(self)
        if self.query.chunk_search is not None:
            join_sql, join_params = self.query.chunk_search.join(self)
            result.append(join_sql)
            params = [*params, *join_params]
        return result, params

    def as_sql(self, with_limits=True, with_col_aliases=False):
        if self.query.chunk_search is not None and self.query.select_for_update and not self.query.select_for_update_of:
            # Row locks cannot reach into the derived table of best chunks
            # (it has DISTINCT): lock the rows the search returns.
            self.query.select_for_update_of = ("self",)
        key = self.query.plain_key(self.using or self.connection.alias, with_limits, with_col_aliases)
        if key is None:
            return base.as_sql(self, with_limits, with_col_aliases)
        literal = self.query.search_literal
        entry = _compiled.get(key)
        if entry is None:
            sql, params = base.as_sql(self, with_limits, with_col_aliases)
            # Where the query vector goes: every other parameter is the same
            # for every plain search of this shape.
            positions = tuple(i for i, param in enumerate(params) if param == literal)
            if len(_compiled) >= SQL_CACHE_SIZE:
                _compiled.clear()
            _compiled[key] = (sql, tuple(params), positions, self.select, self.klass_info, self.annotation_col_map, self.col_count, self.has_extra_select)
            return sql, params
        sql, params, positions, self.select, self.klass_info, self.annotation_col_map, self.col_count, self.has_extra_select = entry
        params = list(params)
        for position in positions:
            params[position] = literal
        return sql, tuple(params)

    compiler = _compilers[base] = type(f"Search{base.__name__}", (base,), {"get_from_clause": get_from_clause, "as_sql": as_sql})
    return compiler


def clear_compiled_searches():
    _compiled.clear()


def _settings_changed(*, setting, **kwargs):
    if setting == SETTING_NAME:
        clear_compiled_searches()


setting_changed.connect(_settings_changed)
