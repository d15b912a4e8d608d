"""The write path end to end: save -> coalesced task -> real worker -> vector."""

import uuid

import numpy as np
import pytest
from django.db import transaction

from semantic import cache
from tests.conftest import pending, wait_until
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True)


def embedding_of(note):
    return Note.objects.values_list("embedding", flat=True).get(pk=note.pk)


def embedded(*notes):
    return all(embedding_of(n) is not None for n in notes)


# The hashed-text cache outlives tests and test runs (the shared Redis keeps
# running): a text seen by an earlier run would be a cache hit, not encoded.
RUN = uuid.uuid4().hex


def unique(text, request):
    # Texts unique to the test and the run.
    return f"{text} [{request.node.nodeid} {RUN}]"


def test_save_is_embedded_by_the_worker(celery_worker, request):
    note = Note.objects.create(title=unique("Quarterly report on river water quality", request), body="Nitrates fell.")
    wait_until(lambda: embedded(note), message="the worker to embed the note")
    row = Note.objects.get(pk=note.pk)
    assert len(row.embedding) == 32
    assert np.isclose(np.linalg.norm(row.embedding), 1.0, atol=1e-5)
    assert row.embedding_vector_hash == row.embedding_source_hash


def test_edit_is_re_embedded(celery_worker, request):
    note = Note.objects.create(title=unique("Original title", request))
    wait_until(lambda: embedded(note), message="first embedding")
    first = np.array(embedding_of(note))
    note.title = unique("A completely different subject: volcanoes", request)
    note.save()
    wait_until(
        lambda: Note.objects.filter(pk=note.pk, embedding_vector_hash=note.embedding_source_hash).exists(),
        message="re-embedding after the edit",
    )
    second = np.array(embedding_of(note))
    assert not np.allclose(first, second)


def test_unchanged_save_encodes_nothing(celery_worker, stats_delta, request):
    note = Note.objects.create(title=unique("Stable text", request))
    wait_until(lambda: embedded(note), message="first embedding")
    encoded_before = stats_delta()["texts_encoded"]
    loaded = Note.objects.get(pk=note.pk)
    loaded.save()
    note.save()  # an instance loaded before the worker ran must not roll the vector back
    assert pending(Note._meta.get_field("embedding")) == 0
    assert embedding_of(note) is not None
    # Give any (wrongly) scheduled task time to run before counting.
    store = cache.get_store()
    cache_key_gone = lambda: not store.client().exists(store.key("semantic:wake:default:testapp.note.embedding"))  # noqa: E731
    wait_until(cache_key_gone, timeout=30, message="the wake-up task to finish")
    assert stats_delta()["texts_encoded"] == encoded_before


def test_same_text_in_two_rows_is_encoded_once(celery_worker, stats_delta, request):
    text = unique("Identical announcement posted twice", request)
    with transaction.atomic():
        first = Note.objects.create(title=text)
        second = Note.objects.create(title=text)
    wait_until(lambda: embedded(first, second), message="both rows embedded")
    assert stats_delta()["texts_encoded"] == 1
    assert np.allclose(embedding_of(first), embedding_of(second))
    third = Note.objects.create(title=text)
    wait_until(lambda: embedded(third), message="third row embedded")
    delta = stats_delta()
    assert delta["texts_encoded"] == 1, "a cached text must not be encoded again"
    assert delta["hits"] >= 1


def test_burst_of_saves_is_encoded_in_a_few_batches(celery_worker, stats_delta, request):
    # 48 separate transactions, each with its own on_commit wake-up.
    notes = [Note.objects.create(title=unique(f"Burst note number {i}", request)) for i in range(48)]
    wait_until(lambda: embedded(*notes), message="the burst to be embedded")
    delta = stats_delta()
    assert delta["texts_encoded"] == 48
    # BATCH_SIZE is 16 in tests: 3 full batches, plus a few partial ones if
    # the worker started while rows were still arriving. Never one per row.
    assert delta["encode_calls"] <= 12, delta


def test_empty_and_whitespace_text_get_no_vector(celery_worker, request):
    note = Note.objects.create(title=unique("Has text", request))
    blank = Note.objects.create(title="   \n\t ", body=None)
    wait_until(lambda: embedded(note), message="the note with text")
    assert blank.embedding_source_hash is None
    assert embedding_of(blank) is None
    note.title, note.body = " ", ""
    note.save()
    assert Note.objects.get(pk=note.pk).embedding_source_hash is None
    # The save woke the worker, which removes the vector the text no longer has.
    wait_until(lambda: Note.objects.filter(pk=note.pk, embedding=None, embedding_vector_hash=None).exists(), message="the emptied note's vector removed")


def test_save_with_update_fields_still_marks_the_row_stale(celery_worker, request):
    note = Note.objects.create(title=unique("Before", request))
    wait_until(lambda: embedded(note), message="first embedding")
    old_hash = note.embedding_source_hash
    note.title = unique("After, saved with update_fields", request)
    note.save(update_fields=["title"])
    row = Note.objects.get(pk=note.pk)
    # save(update_fields=...) runs no pre_save for the hash column: the row is marked instead.
    assert row.embedding_source_hash != old_hash and row.embedding_source_hash.startswith("stale:")
    new_hash = Note._meta.get_field("embedding").compute_source_hash(row)
    wait_until(
        lambda: Note.objects.filter(pk=note.pk, embedding_source_hash=new_hash, embedding_vector_hash=new_hash).exists(),
        message="re-embedding after update_fields save",
    )
