"""Every ORM way a row changes ends with a fresh vector (or none for no text)."""

import numpy as np
import pytest

from semantic.status import FRESH, NO_TEXT, embedding_status
from semantic.tasks import sweep
from semantic.worker import RowWriter, embed_batch
from tests.conftest import pending, wait_until
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True)


def fresh(pk):
    """Whether the row's vector is its current text's (or it has no text and no vector)."""
    return embedding_status(Note._meta.get_field("embedding"), Note.objects.get(pk=pk)) in (FRESH, NO_TEXT)


def all_fresh():
    return pending(Note._meta.get_field("embedding")) == 0


def test_bulk_create_is_embedded(celery_worker, request):
    notes = Note.objects.bulk_create([Note(title=f"Bulk created {i} {request.node.name}") for i in range(20)])
    assert all(n.embedding_source_hash for n in notes)
    wait_until(all_fresh, message="bulk_create rows embedded")
    assert all(fresh(n.pk) for n in notes)


def test_bulk_update_re_embeds_changed_text(celery_worker, request):
    notes = Note.objects.bulk_create([Note(title=f"Before {i} {request.node.name}") for i in range(5)])
    wait_until(all_fresh, message="first embedding")
    old_hashes = dict(Note.objects.values_list("pk", "embedding_vector_hash"))
    for note in notes:
        note.title = f"After bulk_update {note.pk} {request.node.name}"
    notes[0].title, notes[0].body = "  ", None
    Note.objects.bulk_update(notes, ["title", "body"])
    wait_until(all_fresh, message="bulk_update rows re-embedded")
    for note in notes[1:]:
        assert fresh(note.pk) and Note.objects.get(pk=note.pk).embedding_vector_hash != old_hashes[note.pk]
    assert Note.objects.get(pk=notes[0].pk).embedding is None


def test_bulk_update_of_unrelated_fields_keeps_vectors(celery_worker, stats_delta, request):
    notes = Note.objects.bulk_create([Note(title=f"Unrelated {i} {request.node.name}") for i in range(3)])
    wait_until(all_fresh, message="first embedding")
    before = stats_delta()["texts_encoded"]
    for note in notes:
        note.category = "changed"
    Note.objects.bulk_update(notes, ["category"])
    assert all_fresh()
    assert stats_delta()["texts_encoded"] == before


def test_queryset_update_marks_rows_stale_and_they_are_re_embedded(celery_worker, request):
    note = Note.objects.create(title=f"Old headline {request.node.name}")
    wait_until(lambda: fresh(note.pk), message="first embedding")
    first = np.array(Note.objects.get(pk=note.pk).embedding)
    Note.objects.filter(pk=note.pk).update(title=f"New headline about glaciers {request.node.name}")
    wait_until(lambda: fresh(note.pk), message="re-embedding after update()")
    row = Note.objects.get(pk=note.pk)
    assert row.embedding_source_hash == Note._meta.get_field("embedding").compute_source_hash(row)
    assert not np.allclose(first, row.embedding)


def test_queryset_update_of_other_fields_does_not_touch_hashes(celery_worker, request):
    note = Note.objects.create(title=f"Steady {request.node.name}")
    wait_until(lambda: fresh(note.pk), message="first embedding")
    Note.objects.filter(pk=note.pk).update(category="other")
    assert all_fresh()


def test_raw_sql_edit_marked_stale_by_hand_is_re_embedded(celery_worker, request):
    from django.db import connection

    note = Note.objects.create(title=f"Raw {request.node.name}")
    wait_until(lambda: fresh(note.pk), message="first embedding")
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE testapp_note SET title = %s, embedding_source_hash = 'stale:' || gen_random_uuid() WHERE id = %s",
            [f"Edited by raw SQL {request.node.name}", note.pk],
        )
    assert not fresh(note.pk)
    sweep()  # what Celery beat runs every few minutes: it wakes a worker
    wait_until(lambda: fresh(note.pk), message="raw edit re-embedded")


# Direct calls run in the test's own transaction: the background worker
# cannot see these rows, so it cannot race the call under test.
@pytest.mark.django_db(transaction=False)
def test_row_deleted_while_queued_does_not_break_the_batch(request):
    field = Note._meta.get_field("embedding")
    keep = Note.objects.create(title=f"Kept {request.node.name}")
    gone = Note.objects.create(title=f"Deleted {request.node.name}")
    Note.objects.filter(pk=gone.pk).delete()
    result = embed_batch(field)
    assert (result.claimed, result.embedded, result.failed) == (1, 1, [])
    assert fresh(keep.pk)
    # Deleted after its claim: the write-back finds nothing to update.
    writer = RowWriter(field, "default")
    vector = [0.0] * field.dimensions
    assert writer.write_vectors([(gone.pk, gone.embedding_source_hash, gone.embedding_source_hash, vector)]) == []


@pytest.mark.django_db(transaction=False)
@pytest.mark.parametrize(
    "body",
    [
        "emoji \U0001f600 and CJK \u4e2d\u6587 and math \U0001d400",
        "x" * 1_000_000,
    ],
    ids=["non-bmp", "1mb"],
)
def test_awkward_text_is_embedded_without_crashing(body, request):
    field = Note._meta.get_field("embedding")
    note = Note.objects.create(title=request.node.name, body=body)
    result = embed_batch(field)
    assert (result.embedded, result.failed) == (result.claimed, [])
    assert fresh(note.pk)


def test_nul_bytes_from_a_source_are_dropped_before_hashing_and_encoding():
    # PostgreSQL text cannot hold NUL, but a callable source or a property can
    # produce one; it must not reach the tokenizer or change the hash.
    field = Note._meta.get_field("embedding")
    assert field.build_text(Note(title="nul\x00byte")) == "nulbyte"
    assert field.compute_source_hash(Note(title="nul\x00byte")) == field.compute_source_hash(Note(title="nulbyte"))


def test_sweep_finds_raw_sql_edits_and_rows_nothing_woke(celery_worker, request):
    from django.db import connection

    note = Note.objects.create(title=f"Before raw edit {request.node.name}")
    wait_until(lambda: fresh(note.pk), message="first embedding")
    old_vector_hash = Note.objects.get(pk=note.pk).embedding_vector_hash
    with connection.cursor() as cursor:
        cursor.execute("UPDATE testapp_note SET title = %s WHERE id = %s", [f"Raw edit, nobody told {request.node.name}", note.pk])
    report = sweep()
    assert {"testapp.Note.embedding", "demo.Article.embedding"} <= set(report) and not any(report.values()), report
    report = sweep(rehash=True)
    assert report["testapp.Note.embedding"] == 1
    wait_until(lambda: fresh(note.pk), message="raw edit found by the sweep and re-embedded")
    assert Note.objects.get(pk=note.pk).embedding_vector_hash != old_vector_hash
