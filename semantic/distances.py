"""
Distance metrics an EmbeddingField can be searched with.

Each metric pairs a pgvector distance function with the index operator class
that accelerates it and with a similarity ``score`` (higher is closer) built
from the distance, so every search result carries both:

=============  ===================  =======================  ====================
metric         distance             index opclass            score
=============  ===================  =======================  ====================
cosine         1 - cos(a, b)        vector_cosine_ops        1 - distance
inner_product  -(a · b)             vector_ip_ops            -distance (a · b)
l2             ||a - b||            vector_l2_ops            1 / (1 + distance)
=============  ===================  =======================  ====================

For normalised embeddings (the default) the three rankings are identical;
inner product is then the cheapest to compute.
"""

from dataclasses import dataclass

import numpy as np
from django.db.models import ExpressionWrapper, F, FloatField, Value
from pgvector.django import CosineDistance, L2Distance, MaxInnerProduct


@dataclass(frozen=True)
class Metric:
    name: str
    distance_class: type
    opclass: str
    # pgvector's operator, for raw SQL (benchmarks, hybrid fusion).
    operator: str

    def distance(self, column, vector):
        """The distance from ``column`` to ``vector`` (an array, or an expression such as query_value())."""
        if not hasattr(vector, "resolve_expression"):
            vector = query_value(vector)
        return self.distance_class(column, vector)

    def score(self, distance="distance"):
        """An expression for the similarity score of an annotated distance."""
        distance = F(distance) if isinstance(distance, str) else distance
        if self.name == "cosine":
            expression = Value(1.0) - distance
        elif self.name == "inner_product":
            expression = Value(0.0) - distance
        else:
            expression = Value(1.0) / (Value(1.0) + distance)
        return ExpressionWrapper(expression, output_field=FloatField())

    def max_distance(self, min_score):
        """The largest distance whose score is at least ``min_score``."""
        min_score = float(min_score)
        if self.name == "cosine":
            return 1.0 - min_score
        if self.name == "inner_product":
            return -min_score
        if min_score <= 0:
            return float("inf")
        return 1.0 / min_score - 1.0

    def score_of(self, distance):
        """The score for a distance computed in Python."""
        if self.name == "cosine":
            return 1.0 - distance
        if self.name == "inner_product":
            return -distance
        return 1.0 / (1.0 + distance)

    def distances(self, query, matrix):
        """Distances from ``query`` to each row of ``matrix`` (numpy), as pgvector computes them."""
        query = np.asarray(query, dtype=np.float64)
        matrix = np.asarray(matrix, dtype=np.float64)
        if self.name == "cosine":
            norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
            return 1.0 - matrix @ query / norms
        if self.name == "inner_product":
            return -(matrix @ query)
        return np.linalg.norm(matrix - query, axis=1)


def vector_literal(vector):
    """pgvector's text form of a float32 vector, exact and short.

    Nine significant digits round-trip every float32; pgvector's own
    formatting widens to float64 first, which doubles both the text and the
    time to build it (measured: 0.49 ms vs 0.21 ms for 384 dimensions).
    """
    return "[" + ",".join(["%.9g" % value for value in np.asarray(vector, dtype=np.float32).tolist()]) + "]"


def query_value(vector):
    """A query vector as an SQL value, formatted once however often a query uses it."""
    return Value(vector_literal(vector))


METRICS = {
    "cosine": Metric("cosine", CosineDistance, "vector_cosine_ops", "<=>"),
    "inner_product": Metric("inner_product", MaxInnerProduct, "vector_ip_ops", "<#>"),
    "l2": Metric("l2", L2Distance, "vector_l2_ops", "<->"),
}


def get_metric(name):
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)}.") from None
