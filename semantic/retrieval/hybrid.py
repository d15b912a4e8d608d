"""
Hybrid search: reciprocal rank fusion of the vector ranking and PostgreSQL full-text ranking, in one statement.
"""

from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.db.models import F

from semantic.conf import semantic_settings
from semantic.distances import get_metric
from semantic.fields import is_column
from semantic.retrieval.pinned import pinned
from semantic.retrieval.session import search_settings


def text_search_document(field, text_fields=None, config=None):
    """What hybrid search ranks by text: a SearchVectorField column, or ``text_fields`` to vectorise.

    ``text_fields`` defaults to the field's source fields that are columns;
    ``config`` to SEMANTIC["HYBRID_TEXT_CONFIG"]. ImproperlyConfigured when
    there is no column to search.
    """
    model = field.model
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    if text_fields is None:
        text_fields = [name for name in field.source_names() if is_column(model, name)]
        if not text_fields:
            raise ImproperlyConfigured(
                f"{model.__name__}.{field.name} has no source fields that are columns; pass text_fields=[...]."
            )
    for name in text_fields:
        if not is_column(model, name):
            raise ImproperlyConfigured(f"{model.__name__}.{name} is not a column to search by text.")
    if len(text_fields) == 1 and model._meta.get_field(text_fields[0]).get_internal_type() == "SearchVectorField":
        return F(text_fields[0])
    return SearchVector(*text_fields, config=config or semantic_settings.HYBRID_TEXT_CONFIG)


def text_ranking(queryset, document, search_query):
    """``queryset``'s rows that match ``search_query`` (a SearchQuery) in ``document``, best first.

    Ranked by ``ts_rank_cd`` (annotated as ``_text_rank``), ties by primary key.
    """
    return (
        queryset.annotate(_document=document)
        .filter(_document=search_query)
        .annotate(_text_rank=SearchRank(document, search_query, cover_density=True))
        .order_by("-_text_rank", "pk")
    )


# Each ranking numbered by row_number(), joined on the primary key; a row
# missing from one ranking adds nothing for it.
FUSION_SQL = (
    "SELECT coalesce(v.pk, t.pk), "
    "coalesce(%s::float8 / (%s + v.rank), 0) + coalesce(%s::float8 / (%s + t.rank), 0) AS fused, "
    "v.rank, t.rank, v.distance "
    "FROM (SELECT vc.*, row_number() OVER (ORDER BY vc.distance, vc.pk) AS rank "
    "      FROM (SELECT c.* FROM ({vector_sql}) AS c(pk, distance)) AS vc) AS v "
    "FULL OUTER JOIN (SELECT tc.pk, row_number() OVER (ORDER BY tc.text_rank DESC, tc.pk) AS rank "
    "      FROM ({text_sql}) AS tc(pk, text_rank)) AS t ON v.pk = t.pk "
    "ORDER BY fused DESC, coalesce(v.rank, t.rank) LIMIT %s"
)


def hybrid_search(queryset, by_vector, query, field, *, k, text_fields, weights, candidates, config):
    """Fuse ``by_vector`` (a search of ``queryset``'s rows, ``candidates`` long) with the text ranking.

    See SemanticQuerySet.hybrid_search for the contract. Returns a pinned
    QuerySet of the top ``k``.
    """
    vector_weight, text_weight = (float(w) for w in weights)
    config = config or semantic_settings.HYBRID_TEXT_CONFIG
    document = text_search_document(field, text_fields, config)
    search_query = SearchQuery(query, search_type="websearch", config=config)
    by_text = text_ranking(queryset, document, search_query)[:candidates]
    values = by_vector.search_settings()
    vector_sql, vector_params = by_vector.values("pk", "distance").query.sql_with_params()
    text_sql, text_params = by_text.values("pk", "_text_rank").query.sql_with_params()
    rrf = semantic_settings.HYBRID_RRF_K
    params = [vector_weight, rrf, text_weight, rrf, *vector_params, *text_params, k]
    with search_settings(queryset.db, values), connections[queryset.db].cursor() as cursor:
        cursor.execute(FUSION_SQL.format(vector_sql=vector_sql, text_sql=text_sql), params)
        rows = cursor.fetchall()
    metric = get_metric(field.metric)
    ranked = [
        (
            pk,
            {
                "hybrid_score": score,
                "vector_rank": vector_rank,
                "text_rank": text_rank,
                "distance": distance,
                "score": None if distance is None else metric.score_of(distance),
            },
        )
        for pk, score, vector_rank, text_rank, distance in rows
    ]
    return pinned(queryset, ranked, "-hybrid_score")
