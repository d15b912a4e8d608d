"""
Results pinned by a score computed outside the vector search (reranking, fusion, diversity, the REST filter).
"""

from django.contrib.postgres.fields import ArrayField
from django.db.models import F, FloatField, Func, IntegerField, Value
from django.db.models.functions import Cast
from django.db.models.query import ModelIterable

# 1-based position of a row in its ranking: the pinned rows' tie-break, and
# their order when nothing else is asked for.
RANK = "search_rank"
_FLOAT, _INTEGER = FloatField(), IntegerField()


def pinned(queryset, ranked, order_by=RANK, rows=None, types=None):
    """A QuerySet of exactly the rows in ``ranked``, annotated and ordered.

    ``ranked`` is a list of (pk, {annotation: value}) best first. Each
    annotation's values travel as one array parameter, picked by the row's
    position (``array_position`` over the primary keys, annotated as
    ``search_rank``), so the SQL has the same size whatever the number of
    rows (a ``CASE`` per row grew with it: 100 rows took ~25 ms to build),
    and the QuerySet can still be filtered, counted, sliced and paginated,
    reading only those rows. Ordered by ``order_by``, then ``search_rank``.
    ``types`` ({name: model field}) types the annotations; by default an
    annotation whose values are all integers (or None) is an integer, any
    other a float. With ``rows`` ({pk: instance}) the result is already
    evaluated from them, with no query; otherwise it is lazy.
    """
    if not ranked:
        return queryset.none()
    pks = [pk for pk, _ in ranked]
    types = types or {name: _type_of([values[name] for _, values in ranked]) for name in ranked[0][1]}
    position = Func(_array(pks, queryset.model._meta.pk), F("pk"), function="array_position", output_field=_INTEGER)
    annotations = {
        name: _Element(_array([values[name] for _, values in ranked], field), position, output_field=field)
        for name, field in types.items()
    }
    result = queryset.filter(pk__in=pks)
    result.query.clear_ordering(force=True)
    result = result.annotate(**annotations, **{RANK: position}).order_by(*dict.fromkeys([order_by, RANK]))
    if rows is None or result._iterable_class is not ModelIterable:
        return result
    ordered = []
    for rank, (pk, values) in enumerate(ranked, start=1):
        row = rows.get(pk)
        if row is None:
            return result  # deleted meanwhile: let the database say what is left
        for name, value in values.items():
            setattr(row, name, value)
        setattr(row, RANK, rank)
        ordered.append(row)
    result._result_cache = ordered
    result._prefetch_done = True
    return result


def _type_of(values):
    present = [value for value in values if value is not None]
    if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return _INTEGER
    return _FLOAT


def _array(values, base_field):
    field = ArrayField(base_field)
    # The cast names the element type: the driver would pick one from the
    # values (smallint for small numbers), and array_position() compares
    # only equal types.
    return Cast(Value(values, output_field=field), output_field=field)


class _Element(Func):
    """``array[index]`` (PostgreSQL arrays count from 1)."""

    arity = 2

    def as_sql(self, compiler, connection, **extra_context):
        (array_sql, array_params), (index_sql, index_params) = (
            compiler.compile(expression) for expression in self.get_source_expressions()
        )
        return f"({array_sql})[{index_sql}]", (*array_params, *index_params)
