"""
Results pinned by a score computed outside the vector search (reranking, fusion).
"""

from django.db.models import Case, FloatField, IntegerField, Value, When
from django.db.models.query import ModelIterable


def pinned(queryset, ranked, order_by, rows=None):
    """A QuerySet of exactly the rows in ``ranked``, annotated and ordered.

    ``ranked`` is a list of (pk, {annotation: value}) best first. The scores
    live in the SQL (``CASE`` by primary key), so the QuerySet can still be
    filtered, counted and paginated; evaluating it as it is costs no query
    when ``rows`` ({pk: instance}) are given or can be fetched plainly, which
    is cheaper than compiling the ``CASE``s.
    """
    if not ranked:
        return queryset.none()
    annotations = {}
    for name in ranked[0][1]:
        annotations[name] = Case(
            *[When(pk=pk, then=Value(values[name])) for pk, values in ranked],
            output_field=FloatField(),
        )
    position = Case(*[When(pk=pk, then=Value(i)) for i, (pk, _) in enumerate(ranked)], output_field=IntegerField())
    pks = [pk for pk, _ in ranked]
    result = queryset.filter(pk__in=pks)
    result.query.clear_ordering(force=True)
    result = result.annotate(**annotations).annotate(_rank=position).order_by(order_by, "_rank")
    if result._iterable_class is not ModelIterable:
        return result
    if rows is None:
        plain = queryset.filter(pk__in=pks)
        plain.query.clear_ordering(force=True)
        rows = {row.pk: row for row in plain}
    ordered = []
    for rank, (pk, values) in enumerate(ranked):
        row = rows.get(pk)
        if row is None:
            return result  # deleted meanwhile: let the database say what is left
        for name, value in values.items():
            setattr(row, name, value)
        row._rank = rank
        ordered.append(row)
    result._result_cache = ordered
    result._prefetch_done = True
    return result
