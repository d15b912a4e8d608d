"""
What a switch costs a search on the demo: the pointer read, and searching the next slot.

    .venv/bin/python bench/switch.py [--alias bbc-tuned] [--queries 40] [--repeats 3] [--no-write]

Data: the demo's BBC articles (``python manage.py demo --no-serve``) with a
switch of ``demo.Article.embedding`` to ``--alias`` prepared and filled
(``semantic_finetune ... --prepare demo.Article.embedding`` or
``semantic_prepare``, then ``semantic_prepare ... --fill``); the script
refuses to run otherwise. It promotes the switch to time the next slot and
rolls it back at the end (unless it found it promoted).

Rows, interleaved query by query (these 2 cores are shared: compare within
this run):

* raw SQL on the declared chunk table: what a peer writes (demo_search.py's);
* ``nearest(v, k=10)`` with the slot chosen in the code (no pointer read:
  what a search costs on a field without a switch), and while the switch
  fills: the declared slot, with the switch's row read by each search;
* the pointer read alone (``switching.live_slot``), with a switch;
* the same raw SQL on the next slot's chunk table, and ``nearest(v, k=10)``
  once promoted (its query vectors from the next model).

Recall@10 of the promoted search against an exact search of the same slot.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.demo_search import PEER_SQL, QUERIES  # noqa: E402
from bench.report import write_section  # noqa: E402

K = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alias", default="bbc-tuned")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    from project.demo.models import Article
    from semantic import switching
    from semantic.distances import vector_literal
    from semantic.slots import Slot

    settings.SEMANTIC["SWITCH_POLL_SECONDS"] = 0  # promote at once: this process is the only searcher
    field = Article._meta.get_field("embedding")
    upcoming = switching.next_slot(field)
    if upcoming is None or upcoming.alias != args.alias:
        sys.exit(f"Prepare and fill a switch of demo.Article.embedding to {args.alias!r} first (see the docstring).")
    counts = upcoming.count_statuses()
    if counts["pending"]:
        sys.exit(f"The next slot has {counts['pending']:,} pending rows: semantic_prepare demo.Article.embedding --model {args.alias} --fill")
    was_live = switching.live_slot(field).is_next
    if was_live:
        switching.rollback(field)
    declared = Slot(field)
    texts = QUERIES[: args.queries]
    declared_vectors = [v.astype("float32") for v in declared.encoder.model.encode(texts, normalize_embeddings=True)]
    next_vectors = [v.astype("float32") for v in upcoming.encoder.model.encode(texts, normalize_embeddings=True)]
    rows_table = Article._meta.db_table

    def raw(table):
        sql = PEER_SQL.format(chunks=connection.ops.quote_name(table), rows=rows_table)

        def run(vector):
            with connection.cursor() as cursor:
                cursor.execute(sql, [vector_literal(vector)])
                return [row[0] for row in cursor.fetchall()]

        return run

    def orm(vector, **options):
        return [row.pk for row in Article.objects.nearest(vector, k=K, **options)]

    def unswitched(vector):
        # The declared slot chosen in the context: what a search costs where no switch exists.
        with switching.searching(declared):
            return orm(vector)

    def pointer(vector):
        switching.live_slot(field)
        return []

    def timed(variants, vectors):
        for fn in variants.values():
            fn(vectors[0])  # warm up
        times = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for i, vector in enumerate(vectors):
                order = list(variants.items())
                if (i + repeat) % 2:
                    order.reverse()
                for name, fn in order:
                    start = time.perf_counter()
                    fn(vector)
                    times[name].append(time.perf_counter() - start)
        return times

    filling = timed(
        {
            "raw SQL, declared chunk table": raw(declared.chunk_table),
            "`nearest(v, k=10)`, no pointer read (as without a switch)": unswitched,
            "`nearest(v, k=10)`, switch filling (declared slot)": orm,
            "the pointer read alone (`live_slot`)": pointer,
        },
        declared_vectors,
    )
    switching.promote(field)
    try:
        promoted = timed(
            {
                "raw SQL, next chunk table": raw(upcoming.chunk_table),
                "`nearest(v, k=10)`, promoted (next slot)": orm,
            },
            next_vectors,
        )
        recalls = [len(set(orm(v)) & set(orm(v, exact=True))) / K for v in next_vectors]
    finally:
        if not was_live:
            switching.rollback(field)

    def row(name, values, base):
        p50 = statistics.median(values)
        return f"| {name} | {p50 * 1000:.2f} | {p50 / base:.2f}x |"

    base = statistics.median(filling["raw SQL, declared chunk table"])
    next_base = statistics.median(promoted["raw SQL, next chunk table"])
    lines = [
        "## A switch of model, seen by searches",
        "",
        f"`bench/switch.py --alias {args.alias} --queries {len(texts)} --repeats {args.repeats}`, {datetime.date.today()}. "
        f"The demo's {counts['rows']:,} BBC articles switched from {declared.alias!r} to {upcoming.alias!r} "
        f"({upcoming.dimensions} dimensions), both slots filled; k={K}, {platform.machine()}, {os.cpu_count()} shared cores. "
        "Interleaved query by query; medians; each ratio is to the raw SQL on the same slot's chunk table.",
        "",
        "| while the next slot fills | p50 ms | / raw SQL |",
        "|---|---:|---:|",
        *(row(name, values, base) for name, values in filling.items()),
        "",
        "| once promoted | p50 ms | / raw SQL |",
        "|---|---:|---:|",
        *(row(name, values, next_base) for name, values in promoted.items()),
        "",
        f"Recall@10 of the promoted search against an exact search of the next slot: {statistics.mean(recalls):.3f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("switch", text)


if __name__ == "__main__":
    main()
