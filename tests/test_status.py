"""Status of embedding fields: row counts by state, cache counters per fingerprint, check W020."""

import logging

import pytest
from django.conf import settings
from django.core import checks
from django.db import connection
from django.test import override_settings

from semantic import cache
from semantic.encoders import get_encoder
from semantic.status import all_field_statuses, count_rows, field_status
from semantic.tasks import embed_stale_rows
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
    Note.objects.filter(pk=updated.pk).update(title=unique_text("Updated in bulk"))  # the 'stale' marker
    notes(unique_text("Never embedded"))
    Note.objects.create(title="", body=None)
    Note.objects.create(title="   ", body="  ")

    with django_assert_num_queries(1):
        counts = count_rows(FIELD)

    assert counts == {
        "rows": 7,
        "with_text": 5,
        "no_text": 2,
        "stale": 3,
        "embedded_fresh": 2,
        "missing": 1,
        "other_fingerprint": 0,
    }
    status = field_status(FIELD)
    assert {key: status[key] for key in counts} == counts
    assert status["model"] == "testapp.Note" and status["field"] == "embedding" and status["model_alias"] == "tiny"
    assert status["fingerprint"] == FIELD.fingerprint
    assert status["cache"] == cache.get_stats(FIELD.encoder.fingerprint)
    assert all_field_statuses()["testapp.Note.embedding"] == status


@pytest.mark.parametrize(
    "change",
    [{"document_prefix": "passage: "}, {"normalize": False}, {"max_seq_length": 64}],
    ids=["document_prefix", "normalize", "max_seq_length"],
)
def test_vectors_of_another_configuration_are_counted_and_warned_about(change):
    notes(*(unique_text(f"Embedded under the old configuration {i}") for i in range(3)))
    embed_stale_rows(FIELD)
    notes(unique_text("Not embedded yet"))
    assert count_rows(FIELD)["other_fingerprint"] == 0
    assert w020_for_note() == []
    old_fingerprint = FIELD.fingerprint

    with tiny_changed(**change):
        assert FIELD.fingerprint != old_fingerprint
        counts = count_rows(FIELD)
        assert (counts["other_fingerprint"], counts["stale"], counts["embedded_fresh"]) == (3, 4, 0)
        [warning] = w020_for_note()
        assert isinstance(warning, checks.Warning)
        assert warning.msg.startswith("3 row(s) of testapp.Note.embedding")
        assert "they are stale and will be re-embedded; run the worker or semantic_reindex" in warning.msg
        assert "'tiny'" in warning.hint
        # Settings changes drop the encoders: this one is new, and the check
        # and the status computed its fingerprint without loading its model.
        assert not get_encoder("tiny").is_loaded
        # Only `check --database ...` and migrate run database checks.
        assert w020_for_note(databases=None) == []

        assert embed_stale_rows(FIELD)["written"] == 4
        assert count_rows(FIELD)["other_fingerprint"] == 0
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
    assert list(stats.values()) == [{"hits": 3, "misses": 3, "encode_calls": 1, "texts_encoded": 3}] * 2
    totals = stats_delta()
    assert totals["hits"] >= 6 and totals["misses"] >= 6 and totals["texts_encoded"] >= 6
    logged = [record.getMessage() for record in semantic_logs.records if "embedding cache" in record.getMessage()]
    for fingerprint in stats:
        assert f"semantic: embedding cache {fingerprint}: 0 hit(s), 3 miss(es)" in logged
        assert f"semantic: embedding cache {fingerprint}: 3 hit(s), 0 miss(es)" in logged
        assert cache.get_stats(fingerprint) == dict.fromkeys(cache.STAT_NAMES, 0)


@override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}})
def test_counters_work_on_a_cache_without_redis():
    fingerprint = "0123456789abcdef"
    cache.incr_stats(fingerprint, hits=2, misses=1)
    cache.incr_stats(hits=1)
    assert cache.get_stats(fingerprint) == {"hits": 2, "misses": 1, "encode_calls": 0, "texts_encoded": 0}
    assert cache.get_stats()["hits"] == 3
    cache.reset_stats(fingerprint)
    assert cache.get_stats(fingerprint)["hits"] == 0
    assert cache.get_stats()["hits"] == 3
