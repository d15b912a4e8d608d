"""Rows whose text cannot be encoded are set aside as failed, never retried forever.

A *poison* text here is one of more than ``max_chunks`` chunks (Draft allows
6 windows of 14 tokens), the failure a text of millions of characters meets
in production. Also: one text that breaks the encoder fails alone, and the
time budget is checked inside a batch.
"""

import random
import time
import uuid
from io import StringIO

import numpy as np
import pytest
from django.conf import settings
from django.core import checks
from django.core.management import call_command
from django.db import connection

from semantic.chunking import Chunker
from semantic.status import FAILED, FRESH, count_statuses, embedding_status, failure
from semantic.tasks import embed_stale, sweep
from semantic.worker import embed_batch, embed_stale_rows
from tests.conftest import pending, run_admin_action, unique_text, wait_until
from tests.testapp.models import Draft, LongNote, Note
from tests.workers import purge, start_worker_process, stop

FIELD = Draft._meta.get_field("embedding")
QUEUE = "semantic-failures"
WORDS = "river market garden winter music school city harbour forest letter bridge station".split()


def text_of(words, seed):
    """``words`` random words, unique to this call (the embedding cache outlives tests)."""
    rng = random.Random(f"{uuid.uuid4()}-{seed}")
    return " ".join(rng.choice(WORDS) for _ in range(words))


def poison(seed=0):
    return text_of(150, seed)  # about 16 windows: over Draft's max_chunks of 6


def max_attempts():
    return settings.SEMANTIC["MAX_ATTEMPTS"]


@pytest.fixture
def own_queue(settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "QUEUE": QUEUE}
    yield
    purge(QUEUE)


# --- in this process: the pipeline's decisions -------------------------------------


@pytest.mark.django_db
def test_a_poison_row_fails_with_its_reason_while_the_batch_is_embedded(own_queue):
    good = [Draft.objects.create(title=text_of(8, seed)) for seed in range(3)]
    bad = Draft.objects.create(title="Too long", body=poison())

    result = embed_batch(FIELD)
    assert (result.claimed, result.embedded, result.failed) == (4, 3, [bad.pk])
    row = Draft.objects.get(pk=bad.pk)
    attempts, error = failure(FIELD, row)
    assert attempts == 1 and "chunks, more than max_chunks (6)" in error
    # One attempt is not enough to be set aside: the row is still pending...
    assert embedding_status(FIELD, row) != FAILED and pending(FIELD) == 1
    # ... but the same task does not claim it again.
    assert embed_stale_rows(FIELD, skip=result.failed).claimed == 0

    for attempt in range(2, max_attempts() + 1):
        assert embed_stale_rows(FIELD).failed == [bad.pk]
        assert failure(FIELD, Draft.objects.get(pk=bad.pk))[0] == attempt
    row = Draft.objects.get(pk=bad.pk)
    assert embedding_status(FIELD, row) == FAILED
    assert pending(FIELD) == 0 and count_statuses(FIELD)[FAILED] == 1
    assert embed_stale_rows(FIELD).claimed == 0  # set aside: claims skip it
    assert all(embedding_status(FIELD, Draft.objects.get(pk=g.pk)) == FRESH for g in good)

    # Saving the same text keeps it failed; a new text is tried again.
    row.save()
    assert embedding_status(FIELD, Draft.objects.get(pk=bad.pk)) == FAILED
    row.body = "Short enough now."
    row.save()
    assert pending(FIELD) == 1
    assert embed_stale_rows(FIELD).embedded == 1
    row = Draft.objects.get(pk=bad.pk)
    assert embedding_status(FIELD, row) == FRESH and failure(FIELD, row) is None


@pytest.mark.django_db
def test_a_text_that_breaks_the_model_fails_alone(own_queue, monkeypatch):
    notes = [Note.objects.create(title=unique_text(f"Ordinary note {i}")) for i in range(4)]
    broken = Note.objects.create(title=unique_text("This note breaks the tokenizer"))
    field = Note._meta.get_field("embedding")
    model = field.encoder.model
    real_encode = model.encode

    def encode(sentences, **kwargs):
        # As a tokenizer that chokes on one input would.
        if any("breaks the tokenizer" in sentence for sentence in sentences):
            raise ValueError("cannot tokenize this input")
        return real_encode(sentences, **kwargs)

    monkeypatch.setattr(model, "encode", encode)
    result = embed_batch(field)
    assert (result.embedded, result.failed) == (4, [broken.pk])
    _, error = failure(field, Note.objects.get(pk=broken.pk))
    assert error == "encoding a chunk failed: ValueError: cannot tokenize this input"
    assert all(embedding_status(field, Note.objects.get(pk=n.pk)) == FRESH for n in notes)


@pytest.mark.django_db
def test_the_time_budget_is_checked_inside_a_batch(stats_delta, own_queue):
    field = LongNote._meta.get_field("embedding")
    rows = [LongNote.objects.create(body=text_of(700, seed)) for seed in range(2)]
    chunker = Chunker(field.encoder, field.overlap)
    pieces = {chunk.text for row in rows for chunk in chunker.split(field.build_text(row))}
    assert len(pieces) > 128  # more than one slice of 8 passes of 16

    result = embed_batch(field, deadline=time.monotonic())  # out of time already
    assert result.out_of_time and result.claimed == 2
    assert result.deferred + result.embedded == 2 and result.deferred >= 1
    assert stats_delta()["texts_encoded"] == 128  # the first slice only: every round makes progress
    assert pending(field) == result.deferred

    assert embed_batch(field).embedded == result.deferred
    assert pending(field) == 0
    # Nothing was encoded twice: the first slice's vectors were cached.
    assert stats_delta()["texts_encoded"] == len(pieces)


@pytest.mark.django_db
def test_failed_rows_are_reported_by_status_check_and_retried_by_reindex(own_queue):
    bad = Draft.objects.create(body=poison(1))
    for _ in range(max_attempts()):
        embed_stale_rows(FIELD)
    assert embedding_status(FIELD, Draft.objects.get(pk=bad.pk)) == FAILED

    [warning] = [w for w in checks.run_checks(tags=[checks.Tags.database], databases=["default"]) if w.id == "semantic.W022"]
    assert warning.obj is FIELD and warning.msg.startswith("1 row(s) of testapp.Draft.embedding failed")

    out = StringIO()
    call_command("semantic_status", "testapp.Draft", stdout=out)
    assert f"failed       1 (set aside after {max_attempts()} attempts" in out.getvalue()
    assert f"pk {bad.pk}: the text splits into" in out.getvalue()

    # Fixed behind the ORM: the hash does not change, so the row stays failed...
    with connection.cursor() as cursor:
        cursor.execute("UPDATE testapp_draft SET body = %s WHERE id = %s", ["Fixed by hand.", bad.pk])
    assert embedding_status(FIELD, Draft.objects.get(pk=bad.pk)) == FAILED
    # ... until it is retried.
    out, err = StringIO(), StringIO()
    call_command("semantic_reindex", "testapp.Draft", "--failed", "--no-progress", stdout=out, stderr=err)
    assert "1 marked stale by this run" in out.getvalue()
    row = Draft.objects.get(pk=bad.pk)
    assert embedding_status(FIELD, row) == FRESH and failure(FIELD, row) is None
    assert row.embedding_chunks.get().text == "Fixed by hand."


# --- with a real worker process ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_poison_row_is_set_aside_while_a_worker_embeds_the_backlog(tmp_path, own_queue):
    worker = start_worker_process("failures", tmp_path, QUEUE)
    try:
        backlog = Draft.objects.bulk_create([Draft(title=text_of(10, seed)) for seed in range(40)])
        bad = Draft.objects.create(title="A text nobody can embed", body=poison(2))

        def drained():
            # What Celery beat does every few minutes: each sweep is a new
            # task, and each task tries the poison row once more.
            sweep()
            return pending(FIELD) == 0

        wait_until(drained, timeout=180, interval=1, message="the worker to embed the backlog and set the poison row aside")
        row = Draft.objects.get(pk=bad.pk)
        assert embedding_status(FIELD, row) == FAILED
        assert failure(FIELD, row)[0] == max_attempts()
        counts = count_statuses(FIELD)
        assert (counts[FRESH], counts[FAILED], counts["pending"]) == (len(backlog), 1, 0)
        # More sweeps wake the worker, which claims nothing: the row is not retried forever.
        sweep()
        time.sleep(2)
        assert failure(FIELD, Draft.objects.get(pk=bad.pk))[0] == max_attempts()

        # The text is fixed behind the ORM, and an admin retries the row.
        with connection.cursor() as cursor:
            cursor.execute("UPDATE testapp_draft SET body = %s WHERE id = %s", ["Now short.", bad.pk])
        run_admin_action("semantic_reembed", Draft.objects.filter(pk=bad.pk))
        wait_until(
            lambda: embedding_status(FIELD, Draft.objects.get(pk=bad.pk)) == FRESH,
            timeout=60,
            message="the retried row to be embedded",
        )
    finally:
        stop(worker)
    row = Draft.objects.get(pk=bad.pk)
    [chunk] = row.embedding_chunks.all()
    vectors, _ = FIELD.encoder.encode([chunk.text])
    assert chunk.text == "A text nobody can embed\n\nNow short." and np.allclose(row.embedding, vectors[0], atol=1e-5)


@pytest.mark.django_db
def test_embed_stale_does_not_retry_a_row_that_failed_in_the_same_task(own_queue):
    # embed_stale runs twice (before and after clearing the coalescing key):
    # the second run must skip the rows the first one saw fail.
    bad = Draft.objects.create(body=poison(3))
    embed_stale("testapp.Draft", "embedding")
    assert failure(FIELD, Draft.objects.get(pk=bad.pk))[0] == 1
