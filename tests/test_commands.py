"""The management commands: semantic_reindex, semantic_status, semantic_search.

Run through call_command, and as an operator runs them (`python manage.py
...` in a process of its own, on the test database and Redis): exit codes,
one-line errors, JSON that parses, and a reindex interrupted with SIGINT
that a second run finishes without encoding any text twice.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from project.celery import app
from semantic import cache
from semantic.encoders import get_encoder
from semantic.management.commands import semantic_reindex
from semantic.management.commands.semantic_status import queue_length
from semantic.wakeups import release_wake_key
from semantic.worker import embed_stale_rows
from tests.conftest import pending, unique_text
from tests.searchapp.models import Passage
from tests.testapp.models import LongNote, Note

pytestmark = pytest.mark.django_db(transaction=True)

# Wake-ups of the rows these tests create go to a queue no worker consumes
# (an in-thread test worker started by another module may still be running):
# the commands under test must be the only thing that embeds them.
COMMANDS_QUEUE = "semantic-commands"
NOTE = Note._meta.get_field("embedding")
LONG_NOTE = LongNote._meta.get_field("embedding")


@pytest.fixture(autouse=True)
def unconsumed_queue(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "QUEUE": COMMANDS_QUEUE}
    forget_interrupted_runs()
    yield
    with app.connection_for_write() as broker:
        broker.default_channel.queue_purge(COMMANDS_QUEUE)
    for model in (Note, LongNote, Passage):
        release_wake_key(model, "embedding", "default")


def forget_interrupted_runs():
    """Drop the saved progress of --all/--missing runs: it outlives the test database, in Redis."""
    for field in (NOTE, LONG_NOTE):
        for mode in ("all", "all-force", "missing"):
            semantic_reindex.SavedProgress(field, "default", mode).clear()


def run(*args, **options):
    """call_command with captured output; returns (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def operator_env():
    """The environment of `python manage.py ...` run by hand against the test database and Redis."""
    db = connection.settings_dict
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
    }


def manage(*args, env=None, **popen):
    command = [sys.executable, "manage.py", *args]
    return subprocess.Popen(
        command, cwd=settings.BASE_DIR, env=env or operator_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def stale(field=NOTE):
    return pending(field)


def make_notes(count, tag, **fields):
    tag = unique_text(tag)  # the embedding cache outlives test runs
    with transaction.atomic():
        return Note.objects.bulk_create([Note(title=f"{tag} note {i}", **fields) for i in range(count)])


def assert_vectors_match_texts(queryset):
    """Each Note (short texts: one chunk, the row's vector is the text's) has its own text's vector."""
    rows = list(queryset)
    vectors, _ = NOTE.encoder.encode([NOTE.build_text(row) for row in rows])
    for row, vector in zip(rows, vectors):
        assert row.embedding_vector_hash == row.embedding_source_hash == NOTE.compute_source_hash(row)
        assert np.allclose(row.embedding, vector, atol=1e-4)


# --- semantic_reindex ----------------------------------------------------------


def test_reindex_embeds_stale_rows_and_skips_fresh_ones(stats_delta):
    make_notes(30, "Stale")
    embed_stale_rows(NOTE, claim_size=10, time_budget=0)  # one batch: 10 rows fresh, 20 stale
    assert stale() == 20
    before = stats_delta()

    out, err = run("semantic_reindex", "testapp.Note", "--batch-size", "8")

    assert stale() == 0
    assert "testapp.Note.embedding: 20 of 30 rows to embed (10 fresh already, skipped; 0 without text)." in out
    assert "20 embedded or confirmed unchanged, 0 failed; 20 texts encoded" in out
    assert "Done: 20 rows embedded or confirmed unchanged, 10 fresh rows skipped, 20 texts encoded" in out
    assert "rows/s" in err  # the progress bar
    assert stats_delta()["texts_encoded"] - before["texts_encoded"] == 20
    assert_vectors_match_texts(Note.objects.all())


def test_reindex_missing_finds_rows_that_were_never_hashed():
    # As if the rows existed before the EmbeddingField was added: no hashes.
    tag = unique_text("Imported")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO testapp_note (title, body, category) SELECT %s || ' ' || i, NULL, 'general' FROM generate_series(1, 25) AS i",
            [tag],
        )
        cursor.execute("INSERT INTO testapp_note (title, body, category) VALUES ('', NULL, 'general')")
    assert stale() == 0, "the worker cannot see rows that were never hashed"
    out, _ = run("semantic_reindex", "testapp.Note.embedding", "--no-progress")
    assert "0 of 26 rows to embed" in out

    out, _ = run("semantic_reindex", "testapp.Note.embedding", "--missing", "--no-progress")

    assert "25 of 26 rows to embed, 25 marked stale by this run" in out
    assert Note.objects.filter(embedding=None).count() == 1  # the row without text
    assert Note.objects.get(title="").embedding_source_hash is None
    assert_vectors_match_texts(Note.objects.exclude(title=""))


def test_reindex_all_confirms_unchanged_rows_and_re_embeds_text_edited_behind_the_orm(stats_delta):
    notes = make_notes(20, "Checked")
    embed_stale_rows(NOTE)
    edited = notes[:2]
    with connection.cursor() as cursor:  # raw SQL: no hash, no wake-up
        for note in edited:
            cursor.execute("UPDATE testapp_note SET title = %s WHERE id = %s", [unique_text("Rewritten behind the ORM"), note.pk])
    assert stale() == 0
    before = stats_delta()

    out, _ = run("semantic_reindex", "--all", "testapp.Note", "--no-progress")

    assert "20 of 20 rows to embed, 20 marked stale by this run" in out
    assert stats_delta()["texts_encoded"] - before["texts_encoded"] == 2  # only the edited texts
    assert stale() == 0
    assert_vectors_match_texts(Note.objects.all())


def test_reindex_all_force_encodes_every_chunk_again_and_replaces_cached_vectors(stats_delta):
    tag = unique_text("Long")
    with transaction.atomic():
        LongNote.objects.bulk_create(
            [LongNote(title=f"{tag} {i}", body=" ".join(f"sentence {j} of long note {i} {tag}." for j in range(6))) for i in range(4)]
        )
    embed_stale_rows(LONG_NOTE)
    chunk_texts = set(LONG_NOTE.chunk_model.objects.values_list("text_hash", flat=True))
    assert len(chunk_texts) > 4
    old_vectors = cache.get_vectors(sorted(chunk_texts))
    fake = {key: -vector for key, vector in old_vectors.items()}  # as if a broken model had made them
    cache.set_vectors(fake)
    before = stats_delta()

    out, _ = run("semantic_reindex", "testapp.LongNote", "--force", "--no-progress")

    assert stats_delta()["texts_encoded"] - before["texts_encoded"] == len(chunk_texts)
    assert stale(LONG_NOTE) == 0
    assert set(LONG_NOTE.chunk_model.objects.values_list("text_hash", flat=True)) == chunk_texts
    now = cache.get_vectors(sorted(chunk_texts))
    assert all(np.allclose(now[key], old_vectors[key], atol=1e-5) for key in chunk_texts)
    chunks = list(LONG_NOTE.chunk_model.objects.all())
    vectors, _ = LONG_NOTE.encoder.encode([chunk.text for chunk in chunks])
    assert all(np.allclose(chunk.embedding, vector, atol=1e-4) for chunk, vector in zip(chunks, vectors))


def test_an_interrupted_all_force_run_continues_without_re_encoding(monkeypatch, stats_delta):
    make_notes(40, "Forced")
    embed_stale_rows(NOTE)
    real_embed_batch = semantic_reindex.embed_batch
    calls = []

    def second_ctrl_c_after_two_batches(*args, **kwargs):
        result = real_embed_batch(*args, **kwargs)
        calls.append(result)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a second Ctrl-C would, once the batch committed
        return result

    monkeypatch.setattr(semantic_reindex, "embed_batch", second_ctrl_c_after_two_batches)
    before = stats_delta()
    with pytest.raises(CommandError, match="run the same command again to continue") as interrupted:
        run("semantic_reindex", "testapp.Note", "--all", "--force", "--batch-size", "8", "--no-progress")
    assert interrupted.value.returncode == 130
    assert "--restart starts this --all --force run over" in str(interrupted.value)
    assert 0 < stale() < 40
    monkeypatch.setattr(semantic_reindex, "embed_batch", real_embed_batch)

    out, _ = run("semantic_reindex", "testapp.Note", "--all", "--force", "--batch-size", "8", "--no-progress")

    assert "continuing an interrupted --all run (every row is marked already)" in out
    assert stale() == 0
    # Rows re-encoded before the interruption were not marked again.
    assert stats_delta()["texts_encoded"] - before["texts_encoded"] == 40
    # Finished: the next --all --force starts over.
    out, _ = run("semantic_reindex", "testapp.Note", "--all", "--force", "--no-progress")
    assert "40 marked stale by this run" in out


def test_an_interrupted_marking_continues_after_the_last_page(monkeypatch):
    make_notes(25, "Paged")
    embed_stale_rows(NOTE)
    monkeypatch.setattr(semantic_reindex, "MARK_PAGE", 10)
    real_forget = semantic_reindex.forget_cached_vectors
    pages = []

    def ctrl_c_on_the_third_page(*args):
        pages.append(args)
        if len(pages) == 3:
            raise KeyboardInterrupt
        return real_forget(*args)

    monkeypatch.setattr(semantic_reindex, "forget_cached_vectors", ctrl_c_on_the_third_page)
    with pytest.raises(CommandError) as interrupted:
        run("semantic_reindex", "testapp.Note", "--force", "--no-progress")
    assert interrupted.value.returncode == 130
    assert stale() == 20  # two pages marked, nothing embedded yet
    monkeypatch.setattr(semantic_reindex, "forget_cached_vectors", real_forget)

    last_marked = Note.objects.order_by("pk").values_list("pk", flat=True)[19]
    out, _ = run("semantic_reindex", "testapp.Note", "--force", "--no-progress")

    assert f"continuing an interrupted --all run after pk {last_marked}" in out
    assert "25 of 25 rows to embed, 5 marked stale by this run" in out
    assert stale() == 0


def test_reindex_async_queues_one_task_and_embeds_nothing_here():
    make_notes(12, "Queued")
    with app.connection_for_write() as broker:
        broker.default_channel.queue_purge(COMMANDS_QUEUE)  # the bulk_create's wake-up

    out, _ = run("semantic_reindex", "testapp.Note", "--async")

    assert f"testapp.Note.embedding: queued for the workers on queue '{COMMANDS_QUEUE}'" in out
    assert queue_length(COMMANDS_QUEUE) == 1
    assert stale() == 12


def test_reindex_interrupted_with_sigint_resumes_and_encodes_each_text_once(stats_delta):
    rows = 1500
    make_notes(rows, "Interrupted", body="a body long enough to take the tiny model a moment " * 4)
    before = stats_delta()
    reindex = manage("semantic_reindex", "testapp.Note", "--batch-size", "16")
    try:
        deadline = time.monotonic() + 120
        while stale() > rows - 48 and reindex.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        reindex.send_signal(signal.SIGINT)
        out, err = reindex.communicate(timeout=60)
    finally:
        if reindex.poll() is None:
            reindex.kill()
    left = stale()
    assert 0 < left < rows, f"the run was not interrupted mid-way ({left} stale); the test proved nothing\n{err}"
    assert reindex.returncode == 130, err
    assert "Stopping after the current batch" in err
    assert err.strip().splitlines()[-1] == (
        "CommandError: Interrupted; nothing is lost: run the same command again to continue where it stopped."
    )
    assert f"Interrupted in testapp.Note.embedding after {rows - left:,} of {rows:,} rows." in err

    again = manage("semantic_reindex", "testapp.Note", "--batch-size", "16")
    out, err = again.communicate(timeout=300)

    assert again.returncode == 0, err
    assert f"{left:,} of {rows:,} rows to embed ({rows - left:,} fresh already, skipped" in out
    assert stale() == 0
    # No text was encoded twice: the interrupted run stopped between batches.
    assert stats_delta()["texts_encoded"] - before["texts_encoded"] == rows


# --- semantic_status -------------------------------------------------------------


def test_status_json_counts_chunks_indexes_and_the_queue():
    make_notes(6, "Counted")
    embed_stale_rows(NOTE, claim_size=4, time_budget=0)
    with transaction.atomic():
        LongNote.objects.bulk_create([LongNote(title=unique_text("A long note"), body="word " * 60)])
        Passage.objects.bulk_create([Passage(text=unique_text("A passage"), bucket=1)])
    embed_stale_rows(LONG_NOTE)
    chunks = LONG_NOTE.chunk_model.objects.count()

    out, _ = run("semantic_status", "--json")
    status = json.loads(out)

    note = status["fields"]["testapp.Note.embedding"]
    counted = ("rows", "with_text", "pending", "fresh", "stale", "missing", "outdated", "failed", "no_text")
    assert {key: note[key] for key in counted} == {
        "rows": 6, "with_text": 6, "pending": 2, "fresh": 4, "stale": 0, "missing": 2, "outdated": 0, "failed": 0, "no_text": 0,
    }
    assert note["failures"] == []
    assert note["fingerprint"] == NOTE.fingerprint and note["encoder_fingerprint"] == get_encoder("tiny").fingerprint
    assert note["chunks"] == 4 and note["chunk_table"] == "testapp_note_embedding_chunk"
    assert note["index"] == []  # Note has no vector index
    assert [index["type"] for index in note["chunk_index"]] == ["hnsw"]
    assert status["fields"]["testapp.LongNote.embedding"]["chunks"] == chunks > 1
    passage = status["fields"]["searchapp.Passage.embedding"]
    assert passage["index"] == [
        {"name": "passage_embedding_hnsw", "type": "hnsw", "opclass": "vector_cosine_ops", "matches_metric": True}
    ]
    assert passage["chunks"] is None and passage["chunk_index"] is None
    assert 0 <= (note["cache_hit_rate"] or 0) <= 1
    assert status["queue"] == {"name": COMMANDS_QUEUE, "length": queue_length(COMMANDS_QUEUE), "error": None}


def test_status_text_names_each_field_and_the_queue():
    make_notes(3, "Shown")
    out, _ = run("semantic_status", "testapp.Note", "searchapp.Passage")
    assert "testapp.Note.embedding" in out and "searchapp.Passage.embedding" in out
    assert "testapp.LongNote" not in out
    assert "pending 3 (stale 0, missing a vector 3, made by another model or settings 0)" in out
    assert "failed       0" in out
    assert "index        none: searches scan exactly" in out
    assert "passage_embedding_hnsw (hnsw, vector_cosine_ops)" in out
    assert f"Queue '{COMMANDS_QUEUE}': " in out


def test_status_reports_an_unreachable_broker_as_unknown():
    previous = app.conf.get("broker_read_url")
    app.conf.broker_read_url = f"redis://127.0.0.1:1/{settings.TEST_SLOT}"
    try:
        out, _ = run("semantic_status", "--json")
    finally:
        app.conf.broker_read_url = previous
    queue = json.loads(out)["queue"]
    assert queue["length"] is None and "refused" in queue["error"].lower()


def test_status_as_an_operator_runs_it():
    make_notes(5, "Operator")
    status = manage("semantic_status", "--json")
    out, err = status.communicate(timeout=120)
    assert status.returncode == 0, err
    note = json.loads(out)["fields"]["testapp.Note.embedding"]
    assert (note["rows"], note["pending"], note["missing"]) == (5, 5, 5)
    # The operator's process uses the default queue, which nobody filled here.
    assert json.loads(out)["queue"]["name"] == "semantic"


# --- semantic_search -------------------------------------------------------------


@pytest.fixture
def searchable_notes():
    tag = unique_text("")
    texts = [f"volcano eruption {tag}", f"quarterly earnings {tag}", f"football final {tag}", f"river pollution {tag}"]
    with transaction.atomic():
        Note.objects.bulk_create(
            [Note(title=text, category="science" if i % 2 == 0 else "business") for i, text in enumerate(texts)]
        )
    embed_stale_rows(NOTE)
    return texts


def test_search_prints_a_table_with_scores(searchable_notes):
    target = Note.objects.get(title=searchable_notes[1])
    out, _ = run("semantic_search", "testapp.Note", searchable_notes[1], "--k", "3")
    lines = out.splitlines()
    assert lines[0] == f"3 result(s) for {searchable_notes[1]!r} in testapp.Note.embedding (semantic search):"
    assert lines[1].split() == ["rank", "score", "pk", "object", "best", "chunk"]
    first = lines[2].split()
    # The tiny model has no query prefix: the row's own text scores 1.
    assert first[:3] == ["1", "1.0000", str(target.pk)]
    assert "Note object" in lines[2] and "quarterly earnings" in lines[2]
    assert len(lines) == 5


def test_search_json_with_filters_exact_and_hybrid(searchable_notes):
    out, _ = run(
        "semantic_search", "testapp.Note.embedding", searchable_notes[0], "--filter", "category=science", "--exact", "--json"
    )
    data = json.loads(out)
    assert data["mode"] == "semantic" and data["field"] == "embedding"
    titles = [Note.objects.get(pk=r["pk"]).title for r in data["results"]]
    assert titles[0] == searchable_notes[0]
    assert set(titles) == {searchable_notes[0], searchable_notes[2]}  # the science rows only
    assert data["results"][0]["best_chunk"]["text"] == searchable_notes[0]
    assert data["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    out, _ = run("semantic_search", "testapp.Note", "volcano", "--hybrid", "--filter", "category!=business", "--json")
    data = json.loads(out)
    assert data["mode"] == "hybrid"
    assert data["results"][0]["pk"] == Note.objects.get(title=searchable_notes[0]).pk
    assert data["results"][0]["text_rank"] == 1 and "hybrid_score" in data["results"][0]

    out, _ = run("semantic_search", "testapp.Note", "volcano", "--filter", "category__in=nothing,none")
    assert out.startswith("No results for 'volcano'")


def test_search_rerank(searchable_notes, settings, cross_encoder_dir):
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": str(cross_encoder_dir)}
    out, _ = run("semantic_search", "testapp.Note", "earnings", "--rerank", "--k", "2", "--json")
    results = json.loads(out)["results"]
    assert len(results) == 2 and all("rerank_score" in r and "score" in r for r in results)
    assert results[0]["rerank_score"] >= results[1]["rerank_score"]


# --- errors: one line, non-zero exit -----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("semantic_status", "testapp.Nope"), "Unknown model testapp.Nope: App 'testapp' doesn't have a 'Nope' model."),
        (("semantic_status", "Note"), "'Note' is not a model label: write app_label.Model or app_label.Model.field"),
        (("semantic_reindex", "auth.User"), "auth.User has no EmbeddingField."),
        (("semantic_reindex", "testapp.Note.title"), "testapp.Note has no embedding field 'title' (it has: embedding)."),
        (("semantic_reindex", "--missing", "--force"), "--force re-encodes every row: it goes with --all, not --missing."),
        (("semantic_reindex", "--restart"), "--restart goes with --all or --missing"),
        (("semantic_status", "--database", "other"), "Unknown database alias 'other'."),
        (("semantic_search", "testapp.Note", "x", "--filter", "category"), "Bad --filter 'category': write FIELD=VALUE"),
        (("semantic_search", "testapp.Note", "x", "--filter", "colour=red"), "Bad --filter 'colour=red': Cannot resolve keyword 'colour' into field."),
        (("semantic_search", "testapp.Note", "x", "--filter", "id=abc"), "Bad --filter 'id=abc': Field 'id' expected a number but got 'abc'."),
        (("semantic_search", "testapp.Note", "   "), "The query is empty"),
        (("semantic_search", "testapp.Note", "x", "--rerank"), "RERANKER"),
    ],
)
def test_errors_are_one_clear_line(args, message):
    with pytest.raises(CommandError) as error:
        run(*args)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert error.value.returncode == 1


def test_an_unreachable_database_is_one_line_and_exit_status_1(closed_port):
    env = {**operator_env(), "DATABASE_URL": f"postgres://nobody@127.0.0.1:{closed_port}/nothing"}
    for args in (("semantic_status",), ("semantic_reindex", "--no-progress"), ("semantic_search", "testapp.Note", "rivers")):
        process = manage(*args, env=env)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 1, err
        assert err.startswith("CommandError: Database 'default' is unreachable or failing: connection failed:"), err
        assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
def closed_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
