"""
What an edit of a related row costs when 10,000 rows' texts read it.

    .venv/bin/python bench/related_edit.py [--books 10000] [--repeats 5]

tests.testapp's Book reads ``author__name`` (and the author's publisher and
its tags). Renaming an author with N books marks the N books stale through
the database trigger semantic.triggers installs: one UPDATE inside the
author's own statement. Compared in the same run, interleaved, with
(1) the same author save with the trigger dropped (what the save costs
alone), (2) the UPDATE the trigger runs, sent by hand (the floor), and
(3) what a site without it would write: one ``book.save()`` per book (timed
on a sample, extrapolated). Uses tests.settings with SEMANTIC_TEST_SLOT=7, a
throwaway database; writes its table into BENCHMARKS.md.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["SEMANTIC_TEST_SLOT"] = "7"

from bench.report import write_section  # noqa: E402

SAMPLE_SAVES = 200


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--books", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import django

    django.setup()
    from django.db import connection, transaction

    from semantic.triggers import installed_triggers, triggers
    from tests.testapp.models import Author, Book

    began = time.perf_counter()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    times = {"trigger": [], "no_trigger": [], "floor": []}
    try:
        field = Book._meta.get_field("embedding")
        author = Author.objects.create(name="Ted Chiang")
        other = Author.objects.create(name="Someone else")
        Book.objects.bulk_create([Book(title=f"Story {i}", author=author) for i in range(args.books)])
        Book.objects.bulk_create([Book(title=f"Other {i}", author=other) for i in range(args.books)])
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM ANALYZE {Book._meta.db_table}")
        author_trigger = next(t for t in triggers(field, connection) if t.table == Author._meta.db_table)
        assert author_trigger.name in installed_triggers(connection)
        table, source = Book._meta.db_table, field.model._meta.get_field(field.source_hash_attname).column

        def rename():
            author.name = f"Ted Chiang {uuid.uuid4().hex[:6]}"
            start = time.perf_counter()
            author.save()
            return time.perf_counter() - start

        for repeat in range(args.repeats):
            before = set(Book.objects.filter(author=author).values_list(field.source_hash_attname, flat=True))
            times["trigger"].append(rename())
            after = Book.objects.filter(author=author).values_list(field.source_hash_attname, flat=True)
            assert len(set(after)) == args.books and not set(after) & before, "every book marked anew"
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute(f'DROP FUNCTION "{author_trigger.name}"() CASCADE')
                times["no_trigger"].append(rename())
                transaction.set_rollback(True)
            with connection.cursor() as cursor:
                start = time.perf_counter()
                cursor.execute(
                    f'UPDATE "{table}" SET "{source}" = \'stale:\' || replace(gen_random_uuid()::text, \'-\', \'\')'
                    f' WHERE author_id = %s',
                    [author.pk],
                )
                times["floor"].append(time.perf_counter() - start)
                cursor.execute(f"VACUUM {table}")
        books = list(Book.objects.filter(author=author)[:SAMPLE_SAVES])
        start = time.perf_counter()
        for book in books:
            book.save()
        per_save = (time.perf_counter() - start) / len(books)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    saves_ms = per_save * args.books * 1000
    text = "\n".join(
        [
            "## An edit of a related row",
            "",
            f"`bench/related_edit.py --books {args.books} --repeats {args.repeats}`, {datetime.date.today()}. "
            f"An author with {args.books:,} books (and another with as many, untouched) in tests.testapp's Book, "
            "whose text reads `author__name`; PostgreSQL 18, "
            f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs. Medians of {args.repeats} renames, "
            f"interleaved; the one-save-per-book row is timed on {SAMPLE_SAVES} saves and extrapolated. "
            f"Whole run {(time.perf_counter() - began) / 60:.1f} min.",
            "",
            "| what | ms | / trigger |",
            "|---|---:|---:|",
            f"| `author.save()`, the trigger marking the {args.books:,} books (one UPDATE in the same statement) "
            f"| {median['trigger']:.0f} | 1.00x |",
            f"| the same save, trigger dropped (the save alone) | {median['no_trigger']:.1f} | {median['no_trigger'] / median['trigger']:.2f}x |",
            f"| the trigger's UPDATE sent by hand (the floor) | {median['floor']:.0f} | {median['floor'] / median['trigger']:.2f}x |",
            f"| one `book.save()` per book, what a site would write without it | {saves_ms:.0f} | {saves_ms / median['trigger']:.1f}x |",
            "",
        ]
    )
    print(text)
    if not args.no_write:
        write_section("related_edit", text)


if __name__ == "__main__":
    main()
