"""Long texts: token-aware chunks with overlap, one vector each, kept in step with the row."""

import random
import time
import uuid

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, models
from django.test import override_settings
from django.test.utils import isolate_apps

from semantic import EmbeddingField
from semantic.chunking import Chunker, split_text
from semantic.status import NO_TEXT, STALE, embedding_status
from semantic.worker import embed_batch, embed_stale_rows
from tests.conftest import pending, wait_until
from tests.testapp.models import LongNote, Note, NoteEmbeddingChunk, TruncatedNote

# The hashed-text cache (Redis) outlives a test run: texts unique to this run
# keep the encode counts exact.
RUN = uuid.uuid4().hex[:12]

WORDS = (
    "river council school budget report quarterly flood defences library opening hours cycle lanes "
    "heatwave warning football club photosynthesis unbelievably don't 2024 £"
).split()


def prose(words, seed):
    """``words`` random words in sentences; the same for a seed within one run."""
    rng = random.Random(f"{RUN}-{seed}")
    sentences = []
    while words > 0:
        length = min(words, rng.randint(6, 14))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        words -= length
    return " ".join(sentences)


def long_note_field():
    return LongNote._meta.get_field("embedding")


def chunker():
    field = long_note_field()
    return Chunker(field.encoder, field.overlap)


def tokens(text):
    return len(chunker().tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def encode(texts):
    vectors, failed = long_note_field().encoder.encode(texts)
    assert not failed
    return np.stack(vectors)


def stored_chunks(note):
    return list(note.embedding_chunks.order_by("index"))


# --- splitting ----------------------------------------------------------------


def test_chunk_size_is_the_model_limit_less_special_tokens():
    # tiny_short: max_seq_length 16, BERT adds [CLS] and [SEP].
    assert chunker().size == 14
    assert chunker().overlap == 4


def test_a_text_that_fits_is_one_chunk_equal_to_the_whole_text():
    text = "Flood defences strengthened along the river."
    (chunk,) = chunker().split(text)
    assert (chunk.index, chunk.start, chunk.end, chunk.text) == (0, 0, len(text), text)


def assert_well_formed(text, chunks, size, overlap):
    """Slices of the text, within the size, overlapping, covering it all."""
    tokenizer = chunker().tokenizer
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        # Re-tokenizing a chunk gives exactly its tokens: nothing is truncated.
        assert len(tokenizer(chunk.text, add_special_tokens=False, verbose=False)["input_ids"]) == chunk.tokens <= size
    for previous, following in zip(chunks, chunks[1:]):
        assert previous.start < following.start < previous.end < following.end
        shared = text[following.start : previous.end]
        assert len(tokenizer(shared, add_special_tokens=False, verbose=False)["input_ids"]) >= min(overlap, previous.tokens - 1)


def test_long_text_windows_fit_overlap_and_cover_the_text():
    text = prose(300, seed=1)
    chunks = chunker().split(text)
    assert len(chunks) > 20
    assert_well_formed(text, chunks, 14, 4)


def test_windows_start_and_end_on_word_boundaries():
    text = prose(200, seed=2)
    for chunk in chunker().split(text):
        # (Punctuation is a word of its own to the tokenizer.)
        assert chunk.start == 0 or not (text[chunk.start - 1].isalnum() and text[chunk.start].isalnum())
        assert chunk.end == len(text) or not (text[chunk.end - 1].isalnum() and text[chunk.end].isalnum())


def test_offsets_count_characters_outside_the_basic_plane():
    text = " ".join(["emoji \U0001f600 and CJK \u4e2d\u6587 and math \U0001d400 symbols"] * 12)
    chunks = chunker().split(text)
    assert len(chunks) > 3
    assert_well_formed(text, chunks, 14, 4)
    assert any("\U0001f600" in c.text for c in chunks[1:])


def test_a_word_longer_than_a_window_is_cut_between_tokens():
    tokenizer = chunker().tokenizer
    word = "antidisestablishmentarianism" * 3  # one word of more than 14 word pieces
    text = f"start {word} end"
    chunks = split_text(text, tokenizer, 14, 4)
    assert len(chunks) > 2
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(c.text == text[c.start : c.end] and c.tokens <= 14 for c in chunks)


@pytest.mark.parametrize("overlap", [14, 15, -1, 2.5])
def test_overlap_must_be_below_the_chunk_size(overlap):
    with pytest.raises(ImproperlyConfigured, match="overlap"):
        split_text("some text", chunker().tokenizer, 14, overlap)


def test_overlap_not_below_the_model_limit_is_reported_by_checks():
    field = long_note_field()
    with pytest.raises(ImproperlyConfigured, match=r"chunk_overlap=14 must be below the chunk size .* 14 tokens"):
        Chunker(field.encoder, 14)

    @isolate_apps("tests.testapp")
    def declare():
        class Overlapping(models.Model):
            class Meta:
                app_label = "testapp"

            text = models.TextField()
            embedding = EmbeddingField(source="text", model="tiny_short", chunk_overlap=16)

        return [e.id for e in Overlapping.check()]

    assert "semantic.E005" in declare()


@pytest.mark.parametrize("max_chunks", [0, -3, 2.5, True, "many"])
def test_a_chunk_limit_that_is_not_a_positive_integer_is_reported_by_checks(max_chunks):
    @isolate_apps("tests.testapp")
    def declare():
        class Limited(models.Model):
            class Meta:
                app_label = "testapp"

            text = models.TextField()
            embedding = EmbeddingField(source="text", model="tiny_short", max_chunks=max_chunks)

        return [e for e in Limited.check() if e.id == "semantic.E007"]

    [error] = declare()
    assert f"max_chunks must be a positive integer, not {max_chunks!r}" in error.msg


def test_many_tokens_split_in_reasonable_time():
    text = prose(200_000, seed=3)  # about 1.3 MB
    started = time.perf_counter()
    chunks = Chunker(Note._meta.get_field("embedding").encoder, 32).split(text)
    elapsed = time.perf_counter() - started
    assert chunks[-1].end == len(text) and len(chunks) > 1000
    assert elapsed < 30, elapsed


# --- the chunk model ------------------------------------------------------------


def test_chunk_model_is_an_ordinary_model_of_the_owners_app():
    field = Note._meta.get_field("embedding")
    assert field.chunk_model is NoteEmbeddingChunk
    meta = NoteEmbeddingChunk._meta
    assert (meta.app_label, meta.db_table) == ("testapp", "testapp_note_embedding_chunk")
    assert meta.get_field("owner").remote_field.model is Note
    assert meta.get_field("embedding").dimensions == 32
    assert TruncatedNote._meta.get_field("embedding").chunk_model is None
    assert not hasattr(TruncatedNote, "embedding_chunks")


@pytest.mark.django_db
def test_migrations_hold_the_chunk_models():
    # Raises SystemExit if a model (chunk models included) lacks a migration.
    call_command("makemigrations", "testapp", "demo", check=True, dry_run=True, verbosity=0)


@isolate_apps("tests.testapp")
def test_each_concrete_child_of_an_abstract_model_gets_its_own_chunk_model():
    class Base(models.Model):
        text = models.TextField()
        embedding = EmbeddingField(source="text", model="tiny")

        class Meta:
            abstract = True
            app_label = "testapp"

    class First(Base):
        class Meta:
            app_label = "testapp"

    class Second(Base):
        class Meta:
            app_label = "testapp"

    first, second = (m._meta.get_field("embedding").chunk_model for m in (First, Second))
    assert (first.__name__, second.__name__) == ("FirstEmbeddingChunk", "SecondEmbeddingChunk")
    assert first._meta.get_field("owner").remote_field.model is First
    # Registered where its owner is, not in the project's registry.
    assert first._meta.apps is First._meta.apps


# --- the worker: direct calls in the test's transaction -----------------------


@pytest.mark.django_db
def test_long_text_is_stored_as_chunks_encoded_like_their_text():
    text = prose(120, seed=4)
    note = LongNote.objects.create(body=text)
    result = embed_batch(long_note_field())
    assert (result.claimed, result.embedded) == (1, 1)
    chunks = stored_chunks(note)
    expected = chunker().split(text)
    assert len(chunks) == len(expected) > 5
    assert [(c.index, c.start, c.end, c.text) for c in chunks] == [(e.index, e.start, e.end, e.text) for e in expected]
    assert [c.text_hash for c in chunks] == [long_note_field().encoder.text_hash(e.text) for e in expected]
    vectors = np.array([c.embedding for c in chunks])
    assert np.allclose(vectors, encode([c.text for c in chunks]), atol=1e-5)
    # ... and like the plain sentence-transformers model would, with no truncation.
    model = long_note_field().encoder.model
    assert all(tokens(c.text) + 2 <= model.max_seq_length for c in chunks)
    assert np.allclose(vectors, model.encode([c.text for c in chunks], normalize_embeddings=True), atol=1e-5)
    # The row's vector: the token-weighted mean of its chunks, normalised.
    mean = np.average(vectors, axis=0, weights=[e.tokens for e in expected])
    row = LongNote.objects.get(pk=note.pk)
    assert np.allclose(row.embedding, mean / np.linalg.norm(mean), atol=1e-6)
    assert row.embedding_vector_hash == row.embedding_source_hash


@pytest.mark.django_db
def test_short_text_has_one_chunk_with_the_rows_own_vector():
    text = f"Short note {RUN}"
    note = LongNote.objects.create(title=text)
    embed_batch(long_note_field())
    (chunk,) = stored_chunks(note)
    assert (chunk.index, chunk.start, chunk.end, chunk.text) == (0, 0, len(text), text)
    assert np.array_equal(chunk.embedding, LongNote.objects.get(pk=note.pk).embedding)


@pytest.mark.django_db
def test_editing_replaces_the_chunks_and_encodes_only_changed_ones(stats_delta):
    paragraphs = [prose(40, seed=10 + i) for i in range(5)]
    note = LongNote.objects.create(title="Report", body="\n\n".join(paragraphs))
    embed_batch(long_note_field())
    old = stored_chunks(note)
    first_encoded = stats_delta()["texts_encoded"]
    assert first_encoded == len({c.text for c in old})

    paragraphs[-1] = prose(40, seed=99)
    note.body = "\n\n".join(paragraphs)
    note.save()
    assert pending(long_note_field()) == 1
    embed_batch(long_note_field())
    new = stored_chunks(note)
    # Chunks whose text is unchanged are kept as they were, the others replaced.
    kept = {c.text: c.pk for c in old}
    assert {c.pk for c in new if c.text in kept} == {kept[c.text] for c in new if c.text in kept}
    assert not {c.pk for c in new if c.text not in kept} & set(kept.values())
    assert long_note_field().chunk_model.objects.filter(owner=note).count() == len(new)
    assert [c.text for c in new] == [e.text for e in chunker().split(f"Report\n\n{note.body}")]
    changed = {c.text for c in new} - {c.text for c in old}
    assert 0 < len(changed) < len(new) / 2
    assert stats_delta()["texts_encoded"] - first_encoded == len(changed)


@pytest.mark.django_db
def test_clearing_the_text_removes_the_vector_and_the_chunks():
    note = LongNote.objects.create(body=prose(60, seed=5))
    field = long_note_field()
    embed_batch(field)
    assert len(stored_chunks(note)) > 1
    note.title, note.body = "", "   "
    note.save()
    row = LongNote.objects.get(pk=note.pk)
    # The save only says the text is gone; searches leave the row out at
    # once, and it is stale until the worker removes its vector and chunks.
    assert row.embedding_source_hash is None
    assert embedding_status(field, row) == STALE
    assert not LongNote.objects.filter(pk=note.pk).nearest(row.embedding, exact=True).exists()
    assert pending(field) == 1
    result = embed_batch(field)
    assert (result.claimed, result.cleared) == (1, 1)
    row = LongNote.objects.get(pk=note.pk)
    assert row.embedding is None and row.embedding_vector_hash is None
    assert embedding_status(field, row) == NO_TEXT
    assert stored_chunks(note) == []
    assert pending(field) == 0


@pytest.mark.django_db
def test_deleting_a_row_deletes_its_chunks_also_with_raw_sql():
    field = long_note_field()
    orm, raw = (LongNote.objects.create(body=f"{name} " + prose(60, seed=6)) for name in ("orm", "raw"))
    embed_batch(field)
    chunk_model = field.chunk_model
    assert chunk_model.objects.filter(owner__in=[orm, raw]).count() > 2
    orm.delete()
    assert not chunk_model.objects.filter(owner_id=orm.pk).exists()
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM testapp_longnote WHERE id = %s", [raw.pk])
    assert not chunk_model.objects.filter(owner_id=raw.pk).exists()


@pytest.mark.django_db
def test_chunks_false_truncates_at_max_seq_length():
    field = TruncatedNote._meta.get_field("embedding")
    text = prose(120, seed=7)
    note = TruncatedNote.objects.create(body=text)
    embed_batch(field)
    vector = np.array(TruncatedNote.objects.get(pk=note.pk).embedding)
    assert np.allclose(vector, encode([text])[0], atol=1e-5)
    # Everything after the model's first 14 tokens was ignored.
    assert np.allclose(vector, encode([text + " and a different ending"])[0], atol=1e-5)


@pytest.mark.django_db
def test_changing_the_overlap_makes_chunked_rows_stale(settings):
    field = Note._meta.get_field("embedding")
    Note.objects.create(title=f"Chunked under one overlap {RUN}")
    embed_batch(field)
    assert pending(field) == 0
    with override_settings(SEMANTIC={**settings.SEMANTIC, "CHUNK_OVERLAP": 8}):
        assert pending(field) == 1
        embed_batch(field)
        assert pending(field) == 0
        assert Note.objects.get().embedding_vector_hash.startswith(field.fingerprint)


@pytest.mark.django_db
def test_a_long_document_is_chunked_and_embedded(settings):
    # A quarter of a megabyte: a whole megabyte splits in about 2 s (above)
    # but its ~2,700 windows of 128 tokens take 25-50 s to encode on a shared
    # CPU even with the tiny model, too slow for every test run.
    settings.SEMANTIC = {**settings.SEMANTIC, "MAX_CHUNKS": 5000}
    field = Note._meta.get_field("embedding")
    body = prose(40_000, seed=8)
    assert len(body) > 250_000
    note = Note.objects.create(title="A very long document", body=body)
    result = embed_batch(field)
    assert (result.claimed, result.embedded, result.failed) == (1, 1, [])
    chunks = note.embedding_chunks.order_by("index")
    assert chunks.count() > 500
    assert chunks.last().end == len(f"A very long document\n\n{body}")
    assert Note.objects.get(pk=note.pk).embedding is not None


# --- the real worker --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_worker_writes_chunks_after_a_save(celery_worker):
    note = LongNote.objects.create(body=prose(50, seed=9))
    wait_until(lambda: LongNote.objects.filter(pk=note.pk, embedding__isnull=False).exists(), message="the worker to embed")
    assert len(stored_chunks(note)) == len(chunker().split(note.body)) > 1
    assert embed_stale_rows(long_note_field()).claimed == 0
