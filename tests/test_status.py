"""Embedding status: one definition in three forms, row counts by state, cache counters per fingerprint, check W020."""

import itertools
import logging

import pytest
from django.conf import settings
from django.core import checks
from django.db import connection
from django.test import override_settings

from semantic import cache
from semantic.encoders import get_encoder
from semantic.hashing import FINGERPRINT_LENGTH, content_hash, forgotten_text_suffix, new_stale_mark
from semantic.status import (
    FAILED,
    FRESH,
    MISSING,
    NO_TEXT,
    OUTDATED,
    PENDING,
    STALE,
    STATES,
    all_field_statuses,
    count_statuses,
    embedding_status,
    field_status,
    pending_q,
    status_q,
)
from semantic.worker import embed_stale_rows
from tests.conftest import unique_text
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db

FIELD = Note._meta.get_field("embedding")


def tiny_changed(**changes):
    """Settings where the 'tiny' alias (Note's) differs by ``changes``: another fingerprint."""
    models = settings.SEMANTIC["MODELS"]
    return override_settings(SEMANTIC={**settings.SEMANTIC, "MODELS": {**models, "tiny": {**models["tiny"], **changes}}})


def w020_for_note(databases=("default",)):
    issues = checks.run_checks(tags=[checks.Tags.database], databases=databases)
    return [issue for issue in issues if issue.id == "semantic.W020" and issue.obj is FIELD]


def notes(*titles):
    return [Note.objects.create(title=title) for title in titles]


def test_each_row_is_counted_in_its_state(django_assert_num_queries):
    _, edited, updated, _ = notes(*(unique_text(f"Embedded {i}") for i in range(4)))
    embed_stale_rows(FIELD)
    edited.title = unique_text("Edited after embedding")
    edited.save()
    Note.objects.filter(pk=updated.pk).update(title=unique_text("Updated in bulk"))  # a stale mark
    notes(unique_text("Never embedded"))
    Note.objects.create(title="", body=None)
    Note.objects.create(title="   ", body="  ")

    with django_assert_num_queries(1):
        counts = count_statuses(FIELD)

    assert counts == {
        "rows": 7,
        "with_text": 5,
        "pending": 3,
        FRESH: 2,
        STALE: 2,
        MISSING: 1,
        OUTDATED: 0,
        FAILED: 0,
        NO_TEXT: 2,
    }
    status = field_status(FIELD)
    assert {key: status[key] for key in counts} == counts
    assert status["model"] == "testapp.Note" and status["field"] == "embedding" and status["model_alias"] == "tiny"
    assert status["fingerprint"] == FIELD.fingerprint
    assert status["cache"] == cache.get_stats(FIELD.encoder.fingerprint)
    assert all_field_statuses()["testapp.Note.embedding"] == status


def test_the_three_forms_of_the_definition_agree_on_every_combination_of_column_values(settings):
    """status_q, embedding_status and count_statuses: one state per row, the same one, for all values.

    Every combination of the columns the states read: source hash (none, a
    stale mark, the current configuration's hash of two texts, another
    configuration's), vector hash (none, equal, other texts, another
    configuration, a forgotten text), failure record (none, for the current
    source hash, for another) and attempts (below and at MAX_ATTEMPTS).
    """
    current_a, current_b = FIELD.text_hash("text a"), FIELD.text_hash("text b")
    other_a = content_hash("0" * FINGERPRINT_LENGTH, "text a")
    sources = [None, new_stale_mark(), current_a, current_b, other_a]
    vector_hashes = [None, "=source", current_a, current_b, other_a, FIELD.fingerprint + forgotten_text_suffix()]
    failed_hashes = [None, "=source", FIELD.text_hash("text c")]
    attempts = [0, 1, settings.SEMANTIC.get("MAX_ATTEMPTS", 3)]
    vector = [0.1] * FIELD.dimensions
    combinations = list(itertools.product(sources, vector_hashes, failed_hashes, attempts))
    rows = Note._base_manager.bulk_create([Note(title=f"combination {i}") for i in range(len(combinations))])
    for row, (source, vector_hash, failed_hash, count) in zip(rows, combinations):
        vector_hash = source if vector_hash == "=source" else vector_hash
        failed_hash = source if failed_hash == "=source" else failed_hash
        # A vector and its hash are written together: one without the other never exists.
        Note._base_manager.filter(pk=row.pk).update(
            embedding_source_hash=source,
            embedding_vector_hash=vector_hash,
            embedding=None if vector_hash is None else vector,
            embedding_failed_hash=failed_hash,
            embedding_attempts=count,
            embedding_error=None if failed_hash is None else "it failed",
        )

    by_instance = {row.pk: embedding_status(FIELD, row) for row in Note.objects.all()}
    assert set(by_instance.values()) == set(STATES)
    for state in STATES:
        selected = set(Note.objects.filter(status_q(FIELD, state)).values_list("pk", flat=True))
        assert selected == {pk for pk, each in by_instance.items() if each == state}, state
    pending_rows = set(Note.objects.filter(pending_q(FIELD)).values_list("pk", flat=True))
    assert pending_rows == {pk for pk, each in by_instance.items() if each in PENDING}
    counts = count_statuses(FIELD)
    assert {state: counts[state] for state in STATES} == {state: list(by_instance.values()).count(state) for state in STATES}
    assert counts["rows"] == len(combinations) and counts["pending"] == len(pending_rows)


@pytest.mark.parametrize(
    "change",
    [{"document_prefix": "passage: "}, {"normalize": False}, {"max_seq_length": 64}],
    ids=["document_prefix", "normalize", "max_seq_length"],
)
def test_vectors_of_another_configuration_are_counted_and_warned_about(change):
    notes(*(unique_text(f"Embedded under the old configuration {i}") for i in range(3)))
    embed_stale_rows(FIELD)
    notes(unique_text("Not embedded yet"))
    assert count_statuses(FIELD)[OUTDATED] == 0
    assert w020_for_note() == []
    old_fingerprint = FIELD.fingerprint

    with tiny_changed(**change):
        assert FIELD.fingerprint != old_fingerprint
        counts = count_statuses(FIELD)
        assert (counts[OUTDATED], counts[MISSING], counts["pending"], counts[FRESH]) == (3, 1, 4, 0)
        [warning] = w020_for_note()
        assert isinstance(warning, checks.Warning)
        assert warning.msg.startswith("3 row(s) of testapp.Note.embedding")
        assert "searches leave them out until they are re-embedded" in warning.msg
        assert "'tiny'" in warning.hint
        # Settings changes drop the encoders: this one is new, and the check
        # and the status computed its fingerprint without loading its model.
        assert not get_encoder("tiny").is_loaded
        # Only `check --database ...` and migrate run database checks.
        assert w020_for_note(databases=None) == []

        assert embed_stale_rows(FIELD).written == 4
        assert count_statuses(FIELD)[OUTDATED] == 0
        assert w020_for_note() == []


def test_check_skips_a_table_that_is_not_migrated_and_keeps_the_transaction_usable():
    notes(unique_text("Embedded"))
    embed_stale_rows(FIELD)
    with connection.cursor() as cursor:
        # Rolled back with the test's transaction, as a migration not yet run.
        cursor.execute("ALTER TABLE testapp_note RENAME COLUMN embedding_vector_hash TO not_migrated_yet")
    with tiny_changed(document_prefix="passage: "):
        assert w020_for_note() == []
    # The check's failed query was confined to a savepoint.
    assert Note.objects.count() == 1


def test_cache_counters_are_kept_per_fingerprint(semantic_logs, stats_delta):
    semantic_logs.set_level(logging.DEBUG, logger="semantic")
    texts = [unique_text(f"Counted text {i}") for i in range(3)]
    stats = {}
    for run in ("first", "second"):
        # A unique prefix: a fingerprint no other test or run has counted under.
        with tiny_changed(document_prefix=unique_text(run)):
            fingerprint = FIELD.encoder.fingerprint
            notes(*texts)
            embed_stale_rows(FIELD)
            notes(*texts)  # the same texts again: cache hits
            embed_stale_rows(FIELD)
            stats[fingerprint] = cache.get_stats(fingerprint)
            assert field_status(FIELD)["cache"] == stats[fingerprint]
        cache.reset_stats(fingerprint)

    # Each configuration counted only its own work: three texts encoded (in
    # one encode call: BATCH_SIZE is 16 in the test settings), then found.
    assert list(stats.values()) == [{"hits": 3, "misses": 3, "encode_calls": 1, "texts_encoded": 3, "rejected": 0}] * 2
    totals = stats_delta()
    assert totals["hits"] >= 6 and totals["misses"] >= 6 and totals["texts_encoded"] >= 6
    logged = [record.getMessage() for record in semantic_logs.records if "embedding cache" in record.getMessage()]
    for fingerprint in stats:
        assert f"semantic: embedding cache {fingerprint}: 0 hit(s), 3 miss(es)" in logged
        assert f"semantic: embedding cache {fingerprint}: 3 hit(s), 0 miss(es)" in logged
        assert cache.get_stats(fingerprint) == dict.fromkeys(cache.STAT_NAMES, 0)
