"""
Distance metrics an EmbeddingField can be searched with, and the column types it can store.

Each metric pairs a pgvector distance function with the index operator class
that accelerates it and with a similarity ``score`` (higher is closer) built
from the distance, so every search result carries both:

=============  ===================  ==========================  ====================
metric         distance             index opclass               score
=============  ===================  ==========================  ====================
cosine         1 - cos(a, b)        <storage>_cosine_ops        1 - distance
inner_product  -(a · b)             <storage>_ip_ops            -distance (a · b)
l2             ||a - b||            <storage>_l2_ops            1 / (1 + distance)
=============  ===================  ==========================  ====================

For normalised embeddings (the default) the three rankings are identical;
inner product is then the cheapest to compute.

The operator class also names the column type (``storage``): ``vector``
(float32, 4 bytes a dimension) or ``halfvec`` (float16, 2 bytes). An index
built with one type's operator class cannot be built on the other's column.
"""

from dataclasses import dataclass

import numpy as np
from django.db.models import ExpressionWrapper, F, FloatField, Value
from pgvector import HalfVector, Vector
from pgvector.django import CosineDistance, HalfVectorField, L2Distance, MaxInnerProduct, VectorField


@dataclass(frozen=True)
class Storage:
    """A pgvector column type for embeddings.

    ``value_class`` converts values to and from pgvector's text form (what
    the column reads back as: a list of floats); ``field_class`` is
    pgvector's Django field of the type (the chunk table's column).
    ``index_dimensions`` is the most dimensions pgvector's HNSW and IVFFlat
    indexes accept on the type (pgvector 0.8; the column itself holds up
    to MAX_DIMENSIONS).
    """

    name: str
    value_class: type
    field_class: type
    index_dimensions: int

    def db_type(self, dimensions):
        return self.name if dimensions is None else f"{self.name}({int(dimensions)})"


# pgvector's limit for a column of either type.
MAX_DIMENSIONS = 16_000

STORAGES = {
    "vector": Storage("vector", Vector, VectorField, 2_000),
    # Half the bytes per dimension, so an index page holds twice the
    # dimensions: pgvector indexes up to 4,000 of them.
    "halfvec": Storage("halfvec", HalfVector, HalfVectorField, 4_000),
}


def get_storage(name):
    """The Storage called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return STORAGES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown embedding storage {name!r}; choose one of {', '.join(map(repr, STORAGES))} "
            f"(float32, indexable up to {STORAGES['vector'].index_dimensions:,} dimensions, or float16, "
            f"up to {STORAGES['halfvec'].index_dimensions:,})."
        ) from None


def opclass_storage(opclass):
    """The storage an operator class is for (``"halfvec_cosine_ops"`` -> ``"halfvec"``), or None."""
    prefix = str(opclass).partition("_")[0]
    return prefix if prefix in STORAGES else None


@dataclass(frozen=True)
class Metric:
    name: str
    distance_class: type
    # The operator class without its storage prefix ("cosine_ops").
    ops: str
    # pgvector's operator, for raw SQL (benchmarks, hybrid fusion).
    operator: str

    def opclass_for(self, storage):
        """The index operator class of this metric on a ``storage`` column, e.g. ``halfvec_cosine_ops``."""
        return f"{get_storage(storage).name}_{self.ops}"

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
    "cosine": Metric("cosine", CosineDistance, "cosine_ops", "<=>"),
    "inner_product": Metric("inner_product", MaxInnerProduct, "ip_ops", "<#>"),
    "l2": Metric("l2", L2Distance, "l2_ops", "<->"),
}


def get_metric(name):
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)}.") from None
