"""Switching a field to another model without a hole in search (semantic.switching).

The invariants, on real PostgreSQL and the real models:

* while the next slot fills, every search returns what it returned before
  the switch was prepared (the declared slot and its query encoder);
* after promotion every search built from then on ranks by the next
  model, over the next vectors (an exact search equals a numpy oracle of
  the next model's own encodings), and a rollback restores the old results;
* after the workers go idle, every row is fresh in both slots with the
  vector its slot's model makes of its current text, whatever edits came
  in between (seeded random edits between worker batches).

Fields are switched from the 32-dimension tiny model to a 48-dimension one
(``tiny_next``, another seed), so dimensions differ.
"""

import random
import re
import uuid

import numpy as np
import pytest
from django.conf import settings
from django.db import connection
from django.db.models import Case, IntegerField, Value, When

from semantic import switching
from semantic.slots import NextSlot, Slot
from semantic.status import FRESH, NO_TEXT, STATES
from semantic.worker import embed_stale_rows
from tests.conftest import embed_until_idle, other_connection, wait_until
from tests.modelfactory import build_tiny_model
from tests.testapp.models import LongNote, Note, TruncatedNote

pytestmark = pytest.mark.django_db(transaction=True)

NOTE = Note._meta.get_field("embedding")
LONG = LongNote._meta.get_field("embedding")
TRUNCATED = TruncatedNote._meta.get_field("embedding")

WORDS = "harbour lighthouse keeper storm ferry timetable orchard apple cider frost glacier summit climbers rope".split()


@pytest.fixture(scope="module")
def next_model_dir():
    return build_tiny_model(settings.NEXT_MODEL_DIR, dimensions=settings.NEXT_DIMENSIONS, seed=1)


@pytest.fixture(scope="module")
def encoders(next_model_dir):
    """Each alias's model loaded by plain sentence-transformers: the oracle the stored vectors are checked against."""
    from sentence_transformers import SentenceTransformer

    models = {
        "tiny": SentenceTransformer(str(settings.TINY_MODEL_DIR), device="cpu"),
        "tiny_next": SentenceTransformer(str(next_model_dir), device="cpu"),
    }
    models["tiny_next"].max_seq_length = 48
    return lambda alias, text: models[alias].encode(text, normalize_embeddings=True)


@pytest.fixture(autouse=True)
def no_worker_woken(request, settings):
    """Wake-ups go to a queue no worker reads, unless the test runs the session's worker.

    Once a test has started the in-thread Celery worker it keeps consuming
    the embedding queue: a fill of its own would race the partial fills
    these tests look at. (The rows stay pending in PostgreSQL, as the
    tests expect; the queue is purged after the test.)
    """
    if "celery_worker" in request.fixturenames:
        yield
        return
    queue = f"semantic-switch-tests-{uuid.uuid4().hex[:8]}"
    settings.SEMANTIC = {**settings.SEMANTIC, "QUEUE": queue}
    yield
    from tests.workers import purge

    purge(queue)


@pytest.fixture
def switched(next_model_dir):
    """Prepares switches on request; every one is cancelled (rolled back first) after the test."""
    prepared = []

    def prepare(field, alias="tiny_next"):
        slot = switching.prepare(field, alias)
        prepared.append(field)
        return slot

    yield prepare
    for field in prepared:
        state = switching.switch_state(field)
        if state is None:
            continue
        if state[2]:
            switching.rollback(field)
        switching.cancel(field)
    switching.forget_switches()


def sentence(rng, words=5):
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" {uuid.uuid4().hex[:4]}"


def make_notes(count, seed=0):
    rng = random.Random(seed)
    return [Note.objects.create(title=sentence(rng, 3), body=sentence(rng, 4)) for _ in range(count)]


def note_text(note):
    note.refresh_from_db()
    return NOTE.build_text(note)


def ranking(queryset, query, **options):
    return [row.pk for row in queryset.semantic_search(query, k=5, exact=True, **options)]


def elsewhere(sql, params):
    """Run ``sql`` on a connection of its own, committed at once (another process's write)."""
    with other_connection() as other:
        other.execute(sql, params)


def next_vector(note):
    slot = switching.next_slot(NOTE)
    return np.asarray(Note.objects.filter(pk=note.pk).annotate(v=slot.vector()).values_list("v", flat=True).get(), dtype=np.float32)


# --- prepare ------------------------------------------------------------------------------


def test_prepare_adds_the_next_slot_with_its_index_and_nothing_in_search_changes(switched):
    make_notes(6)
    embed_until_idle(Slot(NOTE))
    queries = ["storm at the lighthouse", "apple orchard in frost", "climbers on the summit"]
    before = [ranking(Note.objects, query) for query in queries]

    slot = switched(NOTE)

    assert isinstance(slot, NextSlot) and slot.dimensions == settings.NEXT_DIMENSIONS
    assert switching.index_is_ready(slot)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            [Note._meta.db_table, slot.column_name("vector")],
        )
        assert cursor.fetchone()[0] == f"vector({settings.NEXT_DIMENSIONS})"
    counts = slot.count_statuses()
    assert counts["missing"] == 6 and counts["pending"] == 6
    assert switching.live_slot(NOTE) == Slot(NOTE)
    assert [ranking(Note.objects, query) for query in queries] == before


def test_a_search_during_the_fill_returns_what_it_returned_before(switched):
    make_notes(12, seed=1)
    embed_until_idle(Slot(NOTE))
    queries = ["ferry timetable", "glacier rope", "cider and apples"]
    before = [ranking(Note.objects, query) for query in queries]
    slot = switched(NOTE)
    # A part of the next slot filled: some rows have a next vector, most not.
    embed_stale_rows(slot, claim_size=5, time_budget=0)
    assert 0 < slot.count_statuses()["fresh"] < 12
    assert [ranking(Note.objects, query) for query in queries] == before
    embed_until_idle(slot)
    assert [ranking(Note.objects, query) for query in queries] == before


def test_prepare_refuses_the_declared_configuration_and_a_second_switch(switched):
    with pytest.raises(switching.SwitchError, match="same fingerprint"):
        switching.prepare(NOTE, "tiny")
    switched(NOTE)
    with pytest.raises(switching.SwitchError, match="already being switched"):
        switching.prepare(NOTE, "tiny_short")


# --- promote and roll back -----------------------------------------------------------------


def test_promotion_refuses_while_rows_are_pending_and_force_overrides(switched, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    make_notes(4, seed=2)
    embed_until_idle(Slot(NOTE))
    with pytest.raises(switching.SwitchError, match="no switch"):
        switching.promote(NOTE)
    switched(NOTE)
    with pytest.raises(switching.SwitchError, match="4 of 4 rows with text are still pending"):
        switching.promote(NOTE)
    assert switching.live_slot(NOTE) == Slot(NOTE)
    switching.promote(NOTE, force=True)
    assert switching.live_slot(NOTE).is_next
    # Nothing of the next slot is filled: a forced promotion searches what it covers.
    assert list(Note.objects.semantic_search("storm", k=5)) == []


def test_promotion_flips_every_search_to_the_next_model_and_rollback_restores_the_old_results(switched, encoders, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    notes = make_notes(10, seed=3)
    embed_until_idle(Slot(NOTE))
    queries = ["lighthouse keeper in a storm", "frost on the orchard", "rope for the summit"]
    before = [ranking(Note.objects, query) for query in queries]
    slot = switched(NOTE)
    embed_until_idle(slot)
    built_before = Note.objects.semantic_search(queries[0], k=5, exact=True)

    counts = switching.promote(NOTE)

    assert counts["fresh"] == 10 and counts["pending"] == 0
    for query in queries:
        # The oracle: the next model's own encodings of the rows' texts and the query.
        query_vector = encoders("tiny_next", query)
        expected = sorted(notes, key=lambda note: (-float(encoders("tiny_next", note_text(note)) @ query_vector), note.pk))[:5]
        found = Note.objects.semantic_search(query, k=5, exact=True)
        assert [row.pk for row in found] == [note.pk for note in expected]
        for row in found:
            assert row.score == pytest.approx(float(encoders("tiny_next", note_text(row)) @ query_vector), abs=1e-4)
    # Built before the promotion: the old query vector against the old vectors.
    assert [row.pk for row in built_before] == before[0]
    # Row vectors too: similar_to and collapse read the next slot.
    assert np.allclose(next_vector(notes[0]), encoders("tiny_next", note_text(notes[0])), atol=1e-5)
    assert notes[0].pk not in [row.pk for row in Note.objects.similar_to(notes[0], k=3)]

    switching.rollback(NOTE)

    assert switching.live_slot(NOTE) == Slot(NOTE)
    assert [ranking(Note.objects, query) for query in queries] == before


def test_searches_answer_throughout_the_fill_the_promotion_and_the_rollback(switched, settings):
    """A visitor searching in a loop, on a connection of its own, while the next slot fills and is promoted and rolled back.

    Every search answers, with k rows, and each ranking is the old model's or
    the new one's: never a shrinking subset, never an error.
    """
    import threading
    import time

    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    make_notes(12, seed=8)
    embed_until_idle(Slot(NOTE))
    query = "storm at the lighthouse"
    before = tuple(ranking(Note.objects, query))
    slot = switched(NOTE)
    stop, seen, errors = threading.Event(), [], []

    def visitor():
        from django.db import connection as own

        try:
            while not stop.is_set():
                seen.append(tuple(ranking(Note.objects, query)))
        except Exception as exc:  # reported below, by the test's thread
            errors.append(exc)
        finally:
            own.close()

    thread = threading.Thread(target=visitor)
    thread.start()
    try:
        while slot.count_statuses()["pending"]:
            embed_stale_rows(slot, claim_size=3, time_budget=0)
        searched_during_fill = len(seen)
        switching.promote(NOTE)
        after = tuple(ranking(Note.objects, query))
        time.sleep(0.3)
        switching.rollback(NOTE)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert searched_during_fill > 0 and after != before
    assert set(seen) <= {before, after}
    assert before in seen and after in seen
    # Once rolled back, the old ranking again.
    assert seen[-1] == before


def test_a_query_vector_of_the_old_size_is_refused_after_promotion(switched, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    make_notes(2, seed=4)
    embed_until_idle(Slot(NOTE))
    embed_until_idle(switched(NOTE))
    switching.promote(NOTE)
    with pytest.raises(ValueError, match="48-dimensional vectors \\(its next slot, promoted\\)"):
        Note.objects.nearest(np.ones(settings.TINY_DIMENSIONS), k=3)
    assert len(Note.objects.nearest(np.ones(settings.NEXT_DIMENSIONS), k=3)) == 2


def test_a_process_learns_of_a_promotion_at_its_next_search(switched, settings):
    """Once a field has a switch, each search reads it: another connection's promotion is seen at once."""
    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    make_notes(3, seed=5)
    embed_until_idle(Slot(NOTE))
    embed_until_idle(switched(NOTE))
    assert not switching.live_slot(NOTE).is_next
    with connection.cursor() as cursor:  # as another process would: not through this module
        cursor.execute("UPDATE semantic_switch SET live = true WHERE field = %s", ["testapp.Note.embedding"])
    assert switching.live_slot(NOTE).is_next


# --- chunks and fields without them ----------------------------------------------------


def test_a_chunked_field_searches_the_next_slots_chunks(switched, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    rng = random.Random(6)
    for _ in range(5):
        LongNote.objects.create(title=sentence(rng, 3), body=" ".join(sentence(rng, 8) for _ in range(4)))
    embed_until_idle(Slot(LONG))
    slot = switched(LONG)
    embed_until_idle(slot)
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT count(*), count(DISTINCT owner_id) FROM "{slot.chunk_table}"')
        chunks, owners = cursor.fetchone()
    assert owners == 5 and chunks > 5
    with connection.cursor() as cursor:
        # Vectors kept in the row, as in the declared chunk table (not in TOAST).
        cursor.execute(
            "SELECT attrelid::regclass::text, attstorage FROM pg_attribute WHERE attrelid IN (%s::regclass, %s::regclass) AND attname = 'embedding'",
            [LONG.chunk_model._meta.db_table, slot.chunk_table],
        )
        assert {storage for _, storage in cursor.fetchall()} == {"m"}
    switching.promote(LONG)
    found = list(LongNote.objects.semantic_search("harbour ferry", k=3))
    assert len(found) == 3
    for row in found:
        # The best chunk is the next slot's: a window of the next model's length.
        assert row.best_chunk.text in LONG.build_text(row)
        with connection.cursor() as cursor:
            cursor.execute(f'SELECT text FROM "{slot.chunk_table}" WHERE id = %s', [row.best_chunk.pk])
            assert cursor.fetchone()[0] == row.best_chunk.text
    # Deleting a row deletes its next chunks (the foreign key cascades).
    LongNote.objects.filter(pk=found[0].pk).delete()
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT count(*) FROM "{slot.chunk_table}" WHERE owner_id = %s', [found[0].pk])
        assert cursor.fetchone()[0] == 0


def test_a_field_without_chunks_switches_its_row_vectors(switched, encoders, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    rows = [TruncatedNote.objects.create(body=sentence(random.Random(seed), 6)) for seed in range(4)]
    embed_until_idle(Slot(TRUNCATED))
    slot = switched(TRUNCATED)
    assert slot.chunk_table is None
    embed_until_idle(slot)
    switching.promote(TRUNCATED)
    query = "glacier summit"
    found = [row.pk for row in TruncatedNote.objects.semantic_search(query, k=4, exact=True)]
    vector = encoders("tiny_next", query)
    expected = sorted(rows, key=lambda row: -float(encoders("tiny_next", row.body) @ vector))
    assert found == [row.pk for row in expected]


def test_cancel_drops_the_next_slot(switched):
    make_notes(2, seed=7)
    slot = switched(LONG)
    switching.cancel(LONG)
    assert switching.switch_state(LONG) is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [slot.chunk_table])
        assert cursor.fetchone()[0] is None
        cursor.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname LIKE %s AND NOT attisdropped",
            [LongNote._meta.db_table, "%__next%"],
        )
        assert cursor.fetchone()[0] == 0


# --- the invariant under edits -------------------------------------------------------------


def assert_fresh_in_both_slots_with_their_models(encoders):
    declared, upcoming = Slot(NOTE), switching.next_slot(NOTE)
    for counts in (declared.count_statuses(), upcoming.count_statuses()):
        assert counts["pending"] == 0 and counts["failed"] == 0, counts
    for note in Note.objects.all():
        text = note_text(note)
        if not text:
            assert note.embedding is None
            continue
        assert np.allclose(note.embedding, encoders("tiny", text), atol=1e-5), text
        assert np.allclose(next_vector(note), encoders("tiny_next", text), atol=1e-5), text


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_rows_edited_during_the_fill_end_fresh_in_both_slots(switched, encoders, seed):
    """Seeded edits (saves, update(), emptied texts, deletes, creates) between partial worker batches of both slots."""
    rng = random.Random(seed)
    make_notes(8, seed=seed)
    embed_until_idle(Slot(NOTE))
    switched(NOTE)
    slots = [Slot(NOTE), switching.next_slot(NOTE)]
    for _ in range(25):
        notes = list(Note.objects.order_by("pk"))
        action = rng.choice(["save", "update", "empty", "delete", "create", "work", "work"])
        if action == "save" and notes:
            note = rng.choice(notes)
            note.body = sentence(rng, 4)
            note.save()
        elif action == "update" and notes:
            Note.objects.filter(pk=rng.choice(notes).pk).update(title=sentence(rng, 2))
        elif action == "empty" and notes:
            Note.objects.filter(pk=rng.choice(notes).pk).update(title="", body="")
        elif action == "delete" and len(notes) > 2:
            rng.choice(notes).delete()
        elif action == "create":
            make_notes(1, seed=rng.random())
        else:
            embed_stale_rows(rng.choice(slots), claim_size=rng.randint(1, 4), time_budget=0)
    for slot in slots:
        embed_until_idle(slot)
    assert_fresh_in_both_slots_with_their_models(encoders)


def test_an_edit_made_while_the_next_slot_encodes_is_not_given_the_old_texts_vector(switched, encoders):
    """The guard: the next slot's write lands only on rows whose source hash is still the one read with the text."""
    from semantic.worker import RowWriter, claim, encode_pieces, read_and_plan

    note = make_notes(1, seed=21)[0]
    embed_until_idle(Slot(NOTE))
    slot = switched(NOTE)
    from django.db import transaction

    with transaction.atomic():
        pks = claim(slot, "default", 10)
        _, _, planned, _ = read_and_plan(slot, "default", pks)
        vectors, _, _ = encode_pieces(slot, planned)
        # The row is edited, and committed by another connection, after its text was read.
        elsewhere(f'UPDATE "{Note._meta.db_table}" SET body = %s, embedding_source_hash = %s WHERE id = %s', ["rewritten", uuid.uuid4().hex, note.pk])
        written = RowWriter(slot, "default").write_vectors(
            [(row.pk, row.guard, row.text_hash, vectors[row.keys[0]]) for row in planned]
        )
    assert written == []
    assert slot.count_statuses()["pending"] == 1
    embed_until_idle(Slot(NOTE))
    embed_until_idle(slot)
    assert_fresh_in_both_slots_with_their_models(encoders)


def test_the_next_slots_states_partition_the_rows(switched):
    """Every row is in exactly one state of the next slot, whatever its columns hold."""
    make_notes(5, seed=31)
    embed_until_idle(Slot(NOTE))
    slot = switched(NOTE)
    embed_stale_rows(slot, claim_size=2, time_budget=0)
    Note.objects.filter(pk__in=Note.objects.order_by("pk").values("pk")[:1]).update(title="", body="")
    Note.objects.filter(pk__in=Note.objects.order_by("-pk").values("pk")[:1]).update(title="changed")
    embed_until_idle(Slot(NOTE))
    counts = slot.count_statuses()
    assert sum(counts[state] for state in STATES) == counts["rows"] == 5
    # Each row against every state in one statement (one snapshot).
    in_state = {state: Case(When(slot.status_q(state), then=Value(1)), default=Value(0), output_field=IntegerField()) for state in STATES}
    for row in Note.objects.annotate(**in_state).values("pk", *STATES):
        assert sum(row[state] for state in STATES) == 1, row
    embed_until_idle(slot)
    counts = slot.count_statuses()
    assert counts[FRESH] == 4 and counts[NO_TEXT] == 1


def test_a_woken_celery_worker_fills_the_next_slot(switched, celery_worker, encoders):
    make_notes(4, seed=41)
    wait_until(lambda: Slot(NOTE).count_statuses()["pending"] == 0, message="the declared slot filled")
    slot = switched(NOTE)  # prepare wakes a worker
    wait_until(lambda: slot.count_statuses()["fresh"] == 4, message="the next slot filled by the worker")
    note = Note.objects.first()
    note.body = "a new body for the lighthouse"
    note.save()  # one save wakes the field's task, which fills both slots
    wait_until(
        lambda: Slot(NOTE).count_statuses()["pending"] == 0 and slot.count_statuses()["pending"] == 0,
        message="both slots fresh again",
    )
    assert_fresh_in_both_slots_with_their_models(encoders)


# --- the commands and the admin ----------------------------------------------------------


def call(*args):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_prepare_fill_status_evaluate_promote_and_rollback_from_the_command_line(next_model_dir, settings, tmp_path):
    import json

    from django.core.management.base import CommandError

    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    notes = make_notes(6, seed=51)
    embed_until_idle(Slot(NOTE))
    label = "testapp.Note.embedding"
    try:
        output = call("semantic_prepare", label, "--model", "tiny_next")
        assert "Prepared the switch of testapp.Note.embedding from 'tiny' to 'tiny_next' (48 dimensions" in output
        assert "The workers fill it now." in output
        with pytest.raises(CommandError, match="still pending"):
            call("semantic_promote", label)
        status = json.loads(call("semantic_status", label, "--json"))["fields"][label]["switch"]
        assert (status["alias"], status["live"], status["missing"], status["index_ready"]) == ("tiny_next", False, 6, True)
        assert "switch       to 'tiny_next' (48 dimensions), filling" in call("semantic_status", label)

        output = call("semantic_prepare", label, "--model", "tiny_next", "--fill", "--no-progress")
        assert "Filled: 6 of 6 rows with text fresh in the next slot, 0 failed." in output

        queries = tmp_path / "queries.jsonl"
        queries.write_text("".join(json.dumps({"query": NOTE.build_text(note), "relevant": [note.pk]}) + "\n" for note in notes))
        report = json.loads(call("semantic_evaluate", label, "--queries", str(queries), "--compare-next", "--modes", "exact", "--json"))
        assert set(report["modes"]) == {"exact [tiny]", "exact [tiny_next]"}
        assert [slot["alias"] for slot in report["slots"]] == ["tiny", "tiny_next"]
        # A row's own text finds it first under either model.
        assert report["modes"]["exact [tiny]"]["recall@1"] == report["modes"]["exact [tiny_next]"]["recall@1"] == 1.0
        assert "exact [tiny_next]" in call("semantic_evaluate", label, "--queries", str(queries), "--compare-next", "--modes", "exact")

        assert "Promoted: searches of testapp.Note.embedding use 'tiny_next' (48 dimensions), 6 of 6" in call("semantic_promote", label)
        assert switching.live_slot(NOTE).is_next
        with pytest.raises(CommandError, match="roll it back"):
            call("semantic_prepare", label, "--cancel")
        assert "Rolled back" in call("semantic_promote", label, "--rollback")
        assert not switching.live_slot(NOTE).is_next
        with pytest.raises(CommandError, match="not promoted"):
            call("semantic_promote", label, "--rollback")
    finally:
        if switching.switch_state(NOTE) is not None:
            assert "Cancelled" in call("semantic_prepare", label, "--cancel")
    with pytest.raises(CommandError, match="has no switch"):
        call("semantic_promote", label)


def test_the_admin_changelist_shows_the_fill(admin_client, switched):
    from project.demo.models import Article

    field = Article._meta.get_field("embedding")
    Article.objects.create(topic="tech", title="A phone", body="A new phone was shown.", source_file="switch-1")
    switched(field)
    response = admin_client.get("/admin/demo/article/")
    assert response.status_code == 200
    note = response.content.decode()
    assert 'id="semantic-switch-note"' in note
    # (A worker may have filled it already.)
    assert re.search(
        r"Switching embedding to model &#x27;tiny_next&#x27;: [01] of 1 rows with text embedded \((0|100)%\), [01] pending\. "
        r"Searches use &#x27;default&#x27; until semantic_promote\.",
        note,
    )


def test_a_switch_to_an_alias_the_settings_lost_is_a_checked_error():
    from semantic.checks import check_switches
    from semantic.models import Switch

    assert [error for error in check_switches(databases=["default"]) if error.id == "semantic.E024"] == []
    Switch.objects.create(field="testapp.Note.embedding", alias="gone", dimensions=8, live=True)
    try:
        errors = [error for error in check_switches(databases=["default"]) if error.id == "semantic.E024"]
        assert len(errors) == 1
        assert "'gone'" in errors[0].msg and "every search of the field fails" in errors[0].msg
        assert "semantic_promote --rollback" in errors[0].hint
    finally:
        Switch.objects.all().delete()
        switching.forget_switches()


# --- finishing: the field declares the promoted model -------------------------------------


def test_finish_refills_the_declared_columns_from_the_cache_and_drops_the_next_slot(switched, settings, stats_delta):
    """Switch to a model of the same size, promote, declare it in code: the declared slot is refilled without
    running the model, and finishing changes no result."""
    from django.test import override_settings

    settings.SEMANTIC = {**settings.SEMANTIC, "SWITCH_POLL_SECONDS": 0}
    make_notes(6, seed=61)
    embed_until_idle(Slot(NOTE))
    slot = switched(NOTE, "tiny_revised")
    with pytest.raises(switching.SwitchError, match="not promoted"):
        switching.finish(NOTE)
    embed_until_idle(slot)
    switching.promote(NOTE)
    with pytest.raises(switching.SwitchError, match="still declares 'tiny'"):
        switching.finish(NOTE)
    query = "frost on the orchard"
    promoted = ranking(Note.objects, query)

    # The code now says what the switch promoted (here: the alias the field names gets the revised configuration).
    revised = {**settings.SEMANTIC["MODELS"], "tiny": settings.SEMANTIC["MODELS"]["tiny_revised"]}
    with override_settings(SEMANTIC={**settings.SEMANTIC, "MODELS": revised}):
        assert Slot(NOTE).fingerprint == slot.fingerprint
        assert Slot(NOTE).count_statuses()["outdated"] == 6
        with pytest.raises(switching.SwitchError, match="6 rows of the declared slot are still pending"):
            switching.finish(NOTE)
        assert ranking(Note.objects, query) == promoted  # the next slot answers meanwhile
        encoded = stats_delta()["texts_encoded"]
        embed_until_idle(Slot(NOTE))
        assert stats_delta()["texts_encoded"] == encoded  # every vector came from the cache
        counts = switching.finish(NOTE)
        assert counts["fresh"] == 6
        assert switching.switch_state(NOTE) is None and not switching.live_slot(NOTE).is_next
        assert ranking(Note.objects, query) == promoted
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname LIKE %s AND NOT attisdropped",
                [Note._meta.db_table, "%__next%"],
            )
            assert cursor.fetchone()[0] == 0
            cursor.execute("SELECT to_regclass(%s)", [slot.chunk_table])
            assert cursor.fetchone()[0] is None
