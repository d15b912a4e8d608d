"""
HNSW recall on a real corpus: the 2,225 BBC headlines embedded with the
packaged all-MiniLM-L6-v2, searched through the vector index with default
settings, against sentence-transformers' exact search over the same vectors.
"""

import numpy as np
import pytest
import torch
from django.db import connection
from sentence_transformers import util

from project.demo.corpus import iter_articles
from semantic.retrieval.query_vectors import embed_query
from tests.conftest import store_as_fresh
from tests.searchapp.models import Headline

QUERIES = 100


@pytest.fixture(scope="module")
def headlines(django_db_setup, django_db_blocker):
    articles = list(iter_articles())
    field = Headline._meta.get_field("embedding")
    vectors, failed = field.encoder.encode([a.title for a in articles])
    assert not failed
    with django_db_blocker.unblock():
        rows = Headline.objects.bulk_create([Headline(title=a.title, topic=a.topic) for a in articles], batch_size=1000)
        store_as_fresh(rows, vectors)
        # Planner statistics, as autovacuum would gather them: without them
        # PostgreSQL guesses that filters keep 0.5% of rows.
        connection.cursor().execute(f"ANALYZE {Headline._meta.db_table}")
        stored = list(Headline.objects.order_by("pk").values_list("pk", "embedding"))
        yield articles, [pk for pk, _ in stored], np.array([v for _, v in stored], dtype=np.float32)
        Headline.objects.all().delete()


@pytest.mark.django_db
def test_hnsw_recall_at_10_on_bbc_headlines(headlines):
    articles, ids, vectors = headlines
    field = Headline._meta.get_field("embedding")
    # Queries: each article's first body sentence, a paraphrase-like probe.
    probes = [a.body.split(". ")[0] for a in articles[:: len(articles) // QUERIES][:QUERIES]]
    corpus = torch.tensor(vectors)
    recalls = []
    known_item_hits = 0
    for probe in probes:
        query = embed_query(field, probe)
        truth = util.semantic_search(torch.tensor(query).unsqueeze(0), corpus, top_k=10)[0]
        expected = {ids[hit["corpus_id"]] for hit in truth}
        search = Headline.objects.nearest(query, k=10, exact=False)
        assert "headline_embedding_hnsw" in search.explain()
        found = [row.pk for row in search]
        recalls.append(len(expected & set(found)) / 10)
    assert np.mean(recalls) >= 0.98, f"recall@10 = {np.mean(recalls):.3f}"
    # And the search means something: a probe finds its own headline in the top 10 often.
    for article, probe in zip(articles[:: len(articles) // QUERIES][:QUERIES], probes):
        top = Headline.objects.semantic_search(probe, k=10, exact=False).values_list("title", flat=True)
        known_item_hits += article.title in list(top)
    assert known_item_hits >= 0.6 * QUERIES
