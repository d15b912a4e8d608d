"""A row edited while the worker encodes its old text ends with the vector of its newest text.

The reproduction of the review's bug, for every way a row's text can change:
the row is marked with text T1, the worker claims it and starts encoding T1,
and while it encodes, another connection writes T2 the same way. On the
old code ``update()``, ``mark_stale()`` and the admin's actions wrote one
constant marker, so the worker's guard saw "unchanged" and stored T1's
vector as fresh. Now every write leaves a value no other write repeats.

The worker here is the real pipeline (``embed_batch``) in the test's thread,
with the real tiny model; only ``encode()`` is wrapped, to make the edit
happen while it runs. The expected vectors come from sentence-transformers
directly, not from the app's encoder.
"""

import threading

import numpy as np
import pytest
from django.conf import settings
from django.db import connection, connections

from project.celery import app
from semantic.rehash import rehash_rows
from semantic.status import FRESH, embedding_status
from semantic.wakeups import release_wake_key
from semantic.worker import embed_batch, embed_stale_rows
from tests.conftest import pending, run_admin_action, unique_text
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True)

FIELD = Note._meta.get_field("embedding")
NOBODY = "semantic-nobody"


def raw_sql_edit(pk, title):
    """An edit behind the ORM: the text changes, its hash does not."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE testapp_note SET title = %s WHERE id = %s", [title, pk])


def save(pk, title):
    row = Note.objects.get(pk=pk)
    row.title = title
    row.save()


def save_update_fields(pk, title):
    row = Note.objects.get(pk=pk)
    row.title = title
    row.save(update_fields=["title"])


def update(pk, title):
    Note.objects.filter(pk=pk).update(title=title)


def bulk_update_title(pk, title):
    row = Note.objects.get(pk=pk)
    row.title = title
    Note.objects.bulk_update([row], ["title"])


def bulk_update_whole_text(pk, title):
    row = Note.objects.get(pk=pk)
    row.title = title
    Note.objects.bulk_update([row], ["title", "body"])


def raw_sql_then_mark_stale(pk, title):
    raw_sql_edit(pk, title)
    Note.objects.filter(pk=pk).mark_stale()


def raw_sql_then_admin_reembed(pk, title):
    raw_sql_edit(pk, title)
    run_admin_action("semantic_reembed", Note.objects.filter(pk=pk))


def raw_sql_then_admin_mark_stale(pk, title):
    raw_sql_edit(pk, title)
    run_admin_action("semantic_mark_stale", Note.objects.filter(pk=pk))


def raw_sql_then_sweep(pk, title):
    raw_sql_edit(pk, title)
    rehash_rows(FIELD)  # what the nightly semantic.sweep(rehash=True) runs


WRITE_PATHS = [
    save,
    save_update_fields,
    update,
    bulk_update_title,
    bulk_update_whole_text,
    raw_sql_then_mark_stale,
    raw_sql_then_admin_reembed,
    raw_sql_then_admin_mark_stale,
    raw_sql_then_sweep,
]


@pytest.fixture(scope="module")
def oracle():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(settings.TINY_MODEL_DIR), device="cpu")
    return lambda text: model.encode(text, normalize_embeddings=True)


@pytest.fixture
def no_wake_ups(settings):
    # Wake-ups go to a queue no worker consumes: this test's calls are the only worker.
    settings.SEMANTIC = {**settings.SEMANTIC, "QUEUE": NOBODY}
    yield
    with app.connection_for_write() as broker:
        broker.default_channel.queue_purge(NOBODY)
    release_wake_key(Note, "embedding", "default")


@pytest.mark.parametrize("write", WRITE_PATHS, ids=[w.__name__ for w in WRITE_PATHS])
def test_an_edit_during_encoding_ends_with_the_newest_texts_vector(write, oracle, no_wake_ups, monkeypatch):
    first, second = unique_text("Harbour cranes unload grain ships"), unique_text("Violinists rehearse a quiet sonata")
    note = Note.objects.create(title=unique_text("The text before both edits"))
    embed_stale_rows(FIELD)
    write(note.pk, first)
    assert pending(FIELD) == 1

    encoder = FIELD.encoder
    real_encode = encoder.encode
    test_thread = threading.get_ident()
    edited = []

    def write_second_text_from_another_connection():
        try:
            write(note.pk, second)
            edited.append(True)
        finally:
            connections.close_all()  # this thread's connection

    def encode_then_edit(texts, **kwargs):
        result = real_encode(texts, **kwargs)
        if threading.get_ident() == test_thread and not edited:
            assert texts == [first]
            editor = threading.Thread(target=write_second_text_from_another_connection)
            editor.start()
            editor.join(30)
            assert not editor.is_alive(), "the edit waited for the worker's transaction"
        return result

    monkeypatch.setattr(encoder, "encode", encode_then_edit)
    embed_batch(FIELD)
    assert edited, "encode() did not run, so nothing was edited during it"
    monkeypatch.undo()

    # Whatever the worker wrote, the row must not be fresh with the old text's vector.
    row = Note.objects.get(pk=note.pk)
    assert row.title == second
    assert embedding_status(FIELD, row) != FRESH
    embed_stale_rows(FIELD)
    row = Note.objects.get(pk=note.pk)
    assert embedding_status(FIELD, row) == FRESH
    assert row.embedding_source_hash == FIELD.compute_source_hash(row)
    assert np.allclose(row.embedding, oracle(second), atol=1e-5)
    assert not np.allclose(row.embedding, oracle(first), atol=1e-2)
    [chunk] = row.embedding_chunks.all()
    assert chunk.text == second and np.allclose(chunk.embedding, oracle(second), atol=1e-5)
