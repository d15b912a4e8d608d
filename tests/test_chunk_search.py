"""
Search over chunked rows: each object once, scored by its best chunk, with
that chunk available; checked against distances computed in numpy from the
stored chunk vectors.
"""

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured

from semantic.distances import get_metric
from semantic.retrieval.query_vectors import embed_query
from semantic.worker import embed_stale_rows
from tests.testapp.models import LongNote, Note, TruncatedNote

# Not transactional: the rows stay invisible to the in-thread worker other
# modules start, so only this test embeds them.
pytestmark = pytest.mark.django_db

TOPICS = {
    "weather": "Rain and wind are expected tomorrow, with storms along the coast and snow in the hills.",
    "sport": "The team won the final after extra time, and the captain lifted the trophy in front of the fans.",
    "food": "Fresh bread, soft cheese and ripe tomatoes make a simple lunch on a sunny afternoon.",
    "travel": "The night train crosses the mountains and reaches the old harbour city before dawn.",
    "music": "The orchestra played the symphony twice, and the violins carried the slow movement.",
}


@pytest.fixture
def long_notes():
    """Notes whose bodies run over several 16-token chunks, one topic each plus filler."""
    names = list(TOPICS)
    notes = []
    for i in range(15):
        topic = names[i % len(names)]
        filler = TOPICS[names[(i + 2) % len(names)]]
        notes.append(LongNote.objects.create(title=f"note {i}", body=f"{filler} {TOPICS[topic]} {filler}"))
    totals = embed_stale_rows(LongNote._meta.get_field("embedding"), time_budget=120)
    assert totals.written == len(notes)
    return notes


def best_chunks(query):
    """{owner pk: (best distance, best chunk pk)} from stored vectors, in numpy."""
    field = LongNote._meta.get_field("embedding")
    vector = embed_query(field, query)
    metric = get_metric(field.metric)
    best = {}
    for chunk in field.chunk_model.objects.all():
        distance = float(metric.distances(vector, [chunk.embedding])[0])
        if chunk.owner_id not in best or distance < best[chunk.owner_id][0]:
            best[chunk.owner_id] = (distance, chunk.pk)
    return best


@pytest.mark.parametrize("exact", [True, False])
def test_each_object_once_scored_by_its_best_chunk(long_notes, exact):
    query = "storm warning for the coast"
    expected = sorted(best_chunks(query).items(), key=lambda item: item[1][0])
    assert sum(n.embedding_chunks.count() for n in long_notes) > 2 * len(long_notes)

    results = list(LongNote.objects.semantic_search(query, k=5, exact=exact))
    assert len({r.pk for r in results}) == len(results) == 5
    # Notes share passages, so distances tie: compare distances, and each
    # row's own best distance, rather than the order of tied rows.
    assert [r.distance for r in results] == pytest.approx([d for _, (d, _) in expected[:5]], abs=1e-5)
    by_owner = dict(expected)
    vector = embed_query(LongNote._meta.get_field("embedding"), query)
    for result in results:
        assert result.distance == pytest.approx(by_owner[result.pk][0], abs=1e-5)
        assert result.best_chunk.owner_id == result.pk
        # The chunk handed back is one at the row's best distance.
        own = get_metric("cosine").distances(vector, [result.best_chunk.embedding])[0]
        assert own == pytest.approx(result.distance, abs=1e-5)
        text = LongNote._meta.get_field("embedding").build_text(result)
        assert text[result.best_chunk.start : result.best_chunk.end] == result.best_chunk.text


def test_filters_min_score_and_count_work_by_chunk(long_notes):
    query = "bread and cheese"
    wanted = {n.pk for n in long_notes[:8]}
    everything = list(LongNote.objects.filter(pk__in=wanted).semantic_search(query, exact=True))
    assert {r.pk for r in everything} == wanted
    # A floor between two distinct scores (tied rows share a score).
    cut = next(i for i in range(1, len(everything)) if everything[i - 1].score - everything[i].score > 1e-4)
    floor = (everything[cut - 1].score + everything[cut].score) / 2
    above = LongNote.objects.filter(pk__in=wanted).semantic_search(query, min_score=floor, exact=True)
    assert {r.pk for r in above} == {r.pk for r in everything[:cut]}
    assert above.count() == cut
    after = list(LongNote.objects.semantic_search(query, exact=True).filter(pk__in=wanted))
    assert [r.pk for r in after] == [r.pk for r in everything]


def test_by_chunk_false_ranks_by_the_row_vector(long_notes):
    field = LongNote._meta.get_field("embedding")
    query = "orchestra and violins"
    vector = embed_query(field, query)
    rows = {n.pk: n.embedding for n in LongNote.objects.all()}
    distances = get_metric("cosine").distances(vector, list(rows.values()))
    expected = [pk for _, pk in sorted(zip(distances, rows))][:5]
    results = list(LongNote.objects.semantic_search(query, k=5, by_chunk=False, exact=True))
    assert [r.pk for r in results] == expected
    assert not hasattr(results[0], "best_chunk")


def test_values_and_similar_to_on_a_chunked_field(long_notes):
    values = list(LongNote.objects.semantic_search("night train", k=3, exact=True).values("pk", "distance"))
    assert [v["distance"] for v in values] == sorted(v["distance"] for v in values)
    similar = list(LongNote.objects.similar_to(long_notes[0], k=3, exact=True))
    assert long_notes[0].pk not in [r.pk for r in similar] and len(similar) == 3


def test_by_chunk_on_a_field_without_chunks_is_a_clear_error():
    assert TruncatedNote._meta.get_field("embedding").chunk_model is None
    with pytest.raises(ImproperlyConfigured, match="chunks=False"):
        TruncatedNote.objects.nearest(np.ones(32), by_chunk=True)
    assert Note._meta.get_field("embedding").chunk_model is not None
