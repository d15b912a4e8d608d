"""The worker writes only what changed: vectors in binary, chunks by difference.

Direct calls of the pipeline in the test's transaction (the background
worker cannot see these rows). Chunk rows are compared by primary key and
``xmin`` (the transaction that wrote the row version): a chunk that was not
rewritten keeps both.
"""

import random
import uuid

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from semantic.chunking import Chunker
from semantic.status import FRESH, embedding_status, stale_mark
from semantic.worker import RowWriter, binary_copy_of_vectors, embed_batch
from tests.testapp.models import LongNote, Note

RUN = uuid.uuid4().hex[:12]
WORDS = "river council school budget report flood library opening cycle lanes heatwave warning football club".split()


def prose(words, seed):
    rng = random.Random(f"{RUN}-{seed}")
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def field():
    return LongNote._meta.get_field("embedding")


def chunk_versions(note):
    """{index: (pk, xmin, start, end, text)} of the note's stored chunks."""
    table = field().chunk_model._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT "index", id, xmin::text, "start", "end", text FROM {table} WHERE owner_id = %s ORDER BY 1', [note.pk])
        return {index: rest for index, *rest in cursor.fetchall()}


def assert_fresh_with_its_chunks(note):
    """The invariant the worker keeps: a fresh row's chunks are its text's, each with its text's vector."""
    note = LongNote.objects.get(pk=note.pk)
    f = field()
    assert embedding_status(f, note) == FRESH
    text = f.build_text(note)
    expected = Chunker(f.encoder, f.overlap).split(text)
    stored = list(note.embedding_chunks.order_by("index"))
    assert [(c.index, c.start, c.end, c.text) for c in stored] == [(e.index, e.start, e.end, e.text) for e in expected]
    assert all(text[c.start : c.end] == c.text for c in stored)
    vectors, failed = f.encoder.encode([c.text for c in stored])
    assert not failed
    assert np.allclose(np.array([c.embedding for c in stored]), np.stack(vectors), atol=1e-5)
    mean = np.average(np.stack(vectors), axis=0, weights=[e.tokens for e in expected])
    assert np.allclose(note.embedding, mean / np.linalg.norm(mean), atol=1e-5)


def chunk_writes(queries):
    table = field().chunk_model._meta.db_table
    return [q["sql"] for q in queries if table in q["sql"] and not q["sql"].lstrip().upper().startswith("SELECT")]


@pytest.mark.django_db
def test_vectors_arrive_exactly_as_encoded():
    note = Note.objects.create(title=f"binary {RUN}")
    f = Note._meta.get_field("embedding")
    rng = np.random.default_rng(0)
    vector = rng.standard_normal(f.dimensions).astype(np.float32)
    vector[:4] = [0.0, -0.0, 1e-38, -3.4e38]  # zeros, a denormal-adjacent and a huge value
    guard = note.embedding_source_hash
    assert RowWriter(f, "default").write_vectors([(note.pk, guard, guard, vector)]) == [note.pk]
    stored = Note.objects.get(pk=note.pk).embedding
    assert np.array_equal(np.asarray(stored, dtype=np.float32), vector)


def test_binary_copy_layout():
    payload = binary_copy_of_vectors([np.array([1.0, -2.0], dtype=np.float32)])
    assert payload[:11] == b"PGCOPY\n\xff\r\n\x00" and payload[11:19] == bytes(8)
    row = payload[19:-2]
    # 2 fields; n: 4 bytes, 0; vector: 4 + 2 * 4 bytes, dimension 2, unused 0, then the floats.
    assert row == bytes.fromhex("0002" "00000004" "00000000" "0000000c" "0002" "0000" "3f800000" "c0000000")
    assert payload[-2:] == b"\xff\xff"


def embedded_note(title, body):
    """A LongNote embedded by the worker, and its chunks' versions."""
    note = LongNote.objects.create(title=title, body=body)
    embed_batch(field())
    return note, chunk_versions(note)


def mark_stale(note):
    LongNote.objects.filter(pk=note.pk).mark_stale(wake=False)


def forget_vector(note):
    # semantic_reindex --force: the vector hash matches no text, so the row is
    # encoded again (its chunks are cache hits) and its vector written.
    LongNote.objects.filter(pk=note.pk).update(**stale_mark(field(), forget_vectors=True))


@pytest.mark.django_db
@pytest.mark.parametrize("make_pending, outcome", [(mark_stale, "confirmed"), (forget_vector, "embedded")], ids=["mark_stale", "force"])
def test_an_unchanged_text_writes_no_chunk(make_pending, outcome):
    note, before = embedded_note("Unchanged", prose(60, seed=1))
    assert len(before) > 3
    make_pending(note)
    with CaptureQueriesContext(connection) as queries:
        result = embed_batch(field())
    assert getattr(result, outcome) == result.claimed == 1
    assert chunk_writes(queries.captured_queries) == []
    assert chunk_versions(note) == before
    assert_fresh_with_its_chunks(note)


@pytest.mark.django_db
def test_only_the_changed_chunks_are_rewritten():
    paragraphs = [prose(30, seed=10 + i) for i in range(4)]
    note, before = embedded_note("Report", "\n\n".join(paragraphs))
    paragraphs[-1] = prose(30, seed=99)
    note.body = "\n\n".join(paragraphs)
    note.save()
    embed_batch(field())
    after = chunk_versions(note)
    kept = [index for index, version in after.items() if before.get(index) == version]
    rewritten = [index for index in after if index not in kept]
    assert kept and rewritten
    # Every rewritten chunk has a new row; the kept ones are the leading, untouched windows.
    assert all(after[index][0] != before.get(index, (None,))[0] for index in rewritten)
    assert kept == list(range(len(kept)))
    assert_fresh_with_its_chunks(note)


@pytest.mark.django_db
def test_a_chunk_whose_text_moved_keeps_its_row_and_gets_its_new_offsets():
    # A second space inside the title: the first window's text changes, the
    # tokens do not, so every later window has the same text at an offset
    # one character further on.
    note, before = embedded_note("Weekly report", prose(60, seed=3))
    note.title = "Weekly  report"
    note.save()
    embed_batch(field())
    after = chunk_versions(note)
    assert after.keys() == before.keys()
    assert after[0][0] != before[0][0]  # its text changed: a new row
    for index in list(after)[1:]:
        pk, _, start, end, text = after[index]
        assert (pk, text) == (before[index][0], before[index][4])
        assert (start, end) == (before[index][2] + 1, before[index][3] + 1)
    assert_fresh_with_its_chunks(note)


@pytest.mark.django_db
def test_a_row_edited_during_encoding_keeps_its_old_chunks():
    note, before = embedded_note("Guarded", prose(60, seed=4))
    note.body = prose(60, seed=5)
    note.save()
    f = field()
    stale = LongNote.objects.get(pk=note.pk)
    old_guard = "stale:" + uuid.uuid4().hex  # a source hash the row no longer holds
    writer = RowWriter(f, "default")
    vector = np.ones(f.dimensions, dtype=np.float32)
    assert writer.write_vectors([(note.pk, old_guard, f.text_hash("old"), vector)]) == []
    assert chunk_versions(note) == before
    assert LongNote.objects.get(pk=note.pk).embedding_source_hash == stale.embedding_source_hash
    embed_batch(f)
    assert_fresh_with_its_chunks(note)


@pytest.mark.django_db
def test_rows_of_a_batch_end_fresh_through_edits_clears_and_refills():
    notes = [LongNote.objects.create(title=f"Note {i}", body=prose(20 + 15 * i, seed=20 + i)) for i in range(4)]
    embed_batch(field())
    notes[0].body += " " + prose(10, seed=40)  # longer: a new tail window
    notes[1].body = notes[1].body[: len(notes[1].body) // 2]  # shorter: windows dropped
    notes[2].title, notes[2].body = "", ""  # cleared
    for note in notes[:3]:
        note.save()
    LongNote.objects.filter(pk=notes[3].pk).update(**stale_mark(field(), forget_vectors=True))
    embed_batch(field())
    for note in (notes[0], notes[1], notes[3]):
        assert_fresh_with_its_chunks(note)
    assert chunk_versions(notes[2]) == {}
    notes[2].body = prose(40, seed=41)
    notes[2].save()
    embed_batch(field())
    assert_fresh_with_its_chunks(notes[2])


def test_split_many_splits_like_split_and_isolates_a_text_the_tokenizer_rejects():
    chunker = Chunker(field().encoder, field().overlap)
    texts = [prose(5, seed=50), prose(60, seed=51), "POISON " + prose(8, seed=52), prose(30, seed=53)]
    real = chunker.tokenizer

    def tokenizer(batch, **kwargs):
        if any("POISON" in text for text in batch):
            raise ValueError("cannot tokenize this")
        return real(batch, **kwargs)

    assert chunker.split_many([texts[0], texts[1], texts[3]]) == [chunker.split(text) for text in (texts[0], texts[1], texts[3])]
    chunker.tokenizer = tokenizer
    first, second, third, fourth = chunker.split_many(texts)
    assert isinstance(third, ValueError)
    chunker.tokenizer = real
    assert [first, second, fourth] == [chunker.split(text) for text in (texts[0], texts[1], texts[3])]
