"""FillFactor: a table setting migrations carry, and what it buys (HOT status updates)."""

import random
import time
import uuid

import pytest
from django.apps.registry import Apps
from django.db import connection, models, transaction

from semantic import FillFactor
from semantic.wakeups import release_wake_key
from semantic.worker import embed_batch, embed_stale_rows
from tests.testapp.models import Note

RUN = uuid.uuid4().hex[:12]


# --- the entry itself (no database) --------------------------------------------


@pytest.mark.parametrize("value", [0, 9, 101, 50.0, "50", True, None])
def test_a_fillfactor_out_of_postgresqls_range_is_a_clear_error(value):
    with pytest.raises(ValueError, match="integer percentage from 10 to 100"):
        FillFactor(value, name="t_fillfactor")


def test_the_entry_round_trips_through_a_migration():
    entry = FillFactor(50, name="t_fillfactor")
    path, args, kwargs = entry.deconstruct()
    assert path == "semantic.tables.FillFactor"
    assert FillFactor(*args, **kwargs) == entry
    assert entry != FillFactor(60, name="t_fillfactor")
    assert entry != FillFactor(50, name="other")


# --- the database's view -------------------------------------------------------


def reloptions(table):
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", [table])
        return cursor.fetchone()[0]


@pytest.mark.django_db
def test_a_new_table_gets_the_setting_and_removing_the_entry_resets_it():
    registry = Apps()

    class Shelf(models.Model):
        title = models.TextField()

        class Meta:
            app_label = "testapp"
            apps = registry
            db_table = f"fillfactor_shelf_{RUN}"
            constraints = [FillFactor(40, name=f"shelf_{RUN}_ff")]

    with connection.schema_editor() as editor:
        editor.create_model(Shelf)
    assert reloptions(Shelf._meta.db_table) == ["fillfactor=40"]
    with connection.schema_editor() as editor:
        editor.remove_constraint(Shelf, Shelf._meta.constraints[0])
    assert reloptions(Shelf._meta.db_table) is None
    with connection.schema_editor() as editor:
        editor.add_constraint(Shelf, FillFactor(70, name=f"shelf_{RUN}_ff"))
    assert reloptions(Shelf._meta.db_table) == ["fillfactor=70"]


def row_updates(table):
    """(updates, HOT updates) of ``table`` counted by this session and not yet flushed to the shared statistics."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_stat_get_xact_tuples_updated(%s::regclass), pg_stat_get_xact_tuples_hot_updated(%s::regclass)",
            [table, table],
        )
        return cursor.fetchone()


def wait_until_dead_versions_can_go(timeout=30):
    """Wait until every transaction running now, anywhere in the cluster, has ended.

    Until then PostgreSQL keeps the row versions this session's last
    transactions left dead (a running transaction might still see them), so
    it cannot prune them to make room on their page. A long transaction of
    another job (a CREATE INDEX of a bench, say) makes this test meaningless:
    it is skipped then.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        (newest,) = cursor.fetchone()
        deadline = time.monotonic() + timeout
        while True:
            cursor.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            if cursor.fetchone()[0] >= newest:
                return
            if time.monotonic() > deadline:
                pytest.skip("a long transaction elsewhere in the cluster keeps dead row versions on their pages")
            time.sleep(0.1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("fillfactor", [50, None], ids=["fillfactor-50", "default"])
def test_with_room_on_the_page_marking_and_confirming_are_hot_updates(fillfactor, settings):
    """Rows of ~1.9 kB, four to a page: marks and confirmations fit their page only with FillFactor(50).

    Each step commits, as in production, so that the versions a step leaves
    dead can be pruned from the page before the next step needs the room
    (which also needs no older transaction running: see
    wait_until_dead_versions_can_go).
    """
    # Wake-ups go to a queue no worker reads: this test runs the worker itself.
    settings.SEMANTIC = {**settings.SEMANTIC, "QUEUE": f"test-fillfactor-{RUN}"}
    field = Note._meta.get_field("embedding")
    table = Note._meta.db_table
    entry = FillFactor(fillfactor or 100, name=f"note_{RUN}_ff")
    with connection.schema_editor() as editor:
        editor.add_constraint(Note, entry)
        # An autovacuum ANALYZE of the new rows holds a snapshot that keeps
        # the dead versions on the page: not what this test is about.
        editor.execute(f"ALTER TABLE {editor.quote_name(table)} SET (autovacuum_enabled = false)")
    try:
        rng = random.Random(RUN)
        words = "river council school budget report flood library opening cycle lanes heatwave warning".split()
        # ~1.9 kB rows with their hashes and vector: under the 2 kB past which PostgreSQL compresses them.
        notes = [Note(title=f"note {i} {RUN}", body=" ".join(rng.choice(words) for _ in range(260))[:1500]) for i in range(40)]
        Note.objects.bulk_create(notes)
        embed_stale_rows(field)

        wait_until_dead_versions_can_go()
        with transaction.atomic():
            before = row_updates(table)
            assert Note.objects.filter(pk__in=[n.pk for n in notes]).mark_stale(wake=False) == 40
            marked, marked_hot = (after - already for after, already in zip(row_updates(table), before))
        wait_until_dead_versions_can_go()
        with transaction.atomic():
            before = row_updates(table)
            result = embed_batch(field, claim_size=40)
            confirmed, confirmed_hot = (after - already for after, already in zip(row_updates(table), before))
        assert result.confirmed == 40 and result.embedded == 0
        assert marked == confirmed == 40
        if fillfactor:
            assert (marked_hot, confirmed_hot) == (40, 40)
        else:
            # The contrast that makes the setting worth its space.
            assert marked_hot + confirmed_hot <= 20
    finally:
        # The bulk_create's wake-up went to a queue no worker reads, and its
        # coalescing key would make the next test's saves send none.
        release_wake_key(Note, "embedding", "default")
        with connection.schema_editor() as editor:
            editor.remove_constraint(Note, entry)
            editor.execute(f"ALTER TABLE {editor.quote_name(table)} RESET (autovacuum_enabled)")
