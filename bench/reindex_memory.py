"""
Memory of ``manage.py semantic_reindex`` against table size: the peak RSS
of the command's own process embedding 10,000 and then 100,000 rows.

    SEMANTIC_TEST_SLOT=6 .venv/bin/python bench/reindex_memory.py [--rows 10000 100000] [--batch-size 256] [--no-write]

Each size gets a fresh ``testapp.Note`` table of short, distinct texts
inserted with SQL and never hashed, as rows that existed before the field
was added; ``semantic_reindex testapp.Note --missing`` then marks them stale
in primary-key pages and embeds them with the tiny test model, as an
operator would run it (its own process, the test settings, DEBUG on, so
Django's query log is on too). The process reports its peak RSS
(``getrusage`` ru_maxrss) when it exits. Flat memory means the two peaks
are about equal. ``--keep-query-log`` runs the same command with its
per-batch ``reset_queries()`` disabled, to show what that prevents.

Uses tests.settings on slot SEMANTIC_TEST_SLOT (default 6): a throwaway
``bench_reindex_memory`` database on the embedded PostgreSQL (dropped at the
end) and that slot's Redis database. Results go to stdout and, between
markers, into BENCHMARKS.md.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
os.environ.setdefault("SEMANTIC_TEST_SLOT", "6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATABASE = "bench_reindex_memory"

# Runs manage.py in this process and prints its peak RSS when it exits
# (Django's command ends with sys.exit, which runs atexit hooks).
CHILD = """
import atexit, os, resource, runpy, sys
atexit.register(lambda: os.write(2, b"MAXRSS_KB %d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
if os.environ.get("BENCH_KEEP_QUERY_LOG"):
    import django
    django.setup()
    import semantic.management.commands.semantic_reindex as command
    command.reset_queries = lambda: None
sys.argv = ["manage.py", *sys.argv[1:]]
runpy.run_path("manage.py", run_name="__main__")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=256, help="rows per claim (the production default)")
    parser.add_argument("--keep-query-log", action="store_true", help="also run with reset_queries() disabled")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    began = time.perf_counter()

    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    from tests.modelfactory import build_tiny_model

    build_tiny_model(settings.TINY_MODEL_DIR, dimensions=settings.TINY_DIMENSIONS)
    old_name = connection.settings_dict["NAME"]
    connection.settings_dict["TEST"] = {**connection.settings_dict.get("TEST", {}), "NAME": DATABASE}
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    results = []
    try:
        variants = [False, True] if args.keep_query_log else [False]
        for keep_query_log in variants:
            for rows in args.rows:
                fill(connection, rows)
                result = reindex(connection, settings, rows, args.batch_size, keep_query_log)
                results.append(result)
                print(render_row(result), file=sys.stderr, flush=True)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    text = render(args, results, time.perf_counter() - began)
    print(text)
    if not args.no_write:
        write_section("reindex_memory", text)
        print(f"\nwritten to {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


def fill(connection, rows):
    """A Note table of ``rows`` distinct short texts that were never hashed."""
    # A few tokens each (encoding time is not what is measured here), and a
    # tag no earlier run left in the embedding cache.
    tag = uuid.uuid4().hex[:6]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE testapp_note, testapp_note_embedding_chunk RESTART IDENTITY")
        cursor.execute(
            "INSERT INTO testapp_note (title, body, category)"
            " SELECT 'note ' || i || ' ' || %s, NULL, 'general' FROM generate_series(1, %s) AS i",
            [tag, rows],
        )
        cursor.execute("VACUUM ANALYZE testapp_note")


def reindex(connection, settings, rows, batch_size, keep_query_log):
    db = connection.settings_dict
    env = {
        # One torch thread: on a shared 2-core machine more threads spin
        # against each other and the tiny model runs ~50x slower.
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
    }
    if keep_query_log:
        env["BENCH_KEEP_QUERY_LOG"] = "1"
    command = [sys.executable, "-c", CHILD, "semantic_reindex", "testapp.Note", "--missing",
               "--batch-size", str(batch_size), "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"semantic_reindex failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak = int(re.search(r"MAXRSS_KB (\d+)", done.stderr).group(1))
    summary = re.search(r"([\d,]+) rows in ([\d.]+) s \(([\d,]+) rows/s\)", done.stdout)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM testapp_note WHERE embedding IS NOT NULL")
        embedded = cursor.fetchone()[0]
    assert embedded == rows, f"{embedded} of {rows} rows embedded"
    return {
        "rows": rows,
        "batch_size": batch_size,
        "query_log": keep_query_log,
        "wall_s": wall,
        "embed_s": float(summary.group(2)),
        "rows_per_s": int(summary.group(3).replace(",", "")),
        "peak_mib": peak / 1024,
    }


def render_row(result):
    log = "kept (reset_queries disabled)" if result["query_log"] else "reset per batch"
    return (
        f"| {result['rows']:,} | {log} | {result['wall_s']:.0f} | {result['embed_s']:.0f} | "
        f"{result['rows_per_s']:,} | {result['peak_mib']:.0f} |"
    )


def render(args, results, total):
    today = datetime.date.today().isoformat()
    lines = [
        "## Reindex memory",
        "",
        f"`bench/reindex_memory.py --rows {' '.join(map(str, args.rows))} --batch-size {args.batch_size}`, {today}. "
        f"`manage.py semantic_reindex testapp.Note --missing` in its own process on a table of N never-hashed short "
        f"texts (tiny 32-dim test model, CPU; DEBUG on as in the demo project). Peak RSS is the process's ru_maxrss "
        f"(Python, torch and the model included); OMP_NUM_THREADS=1. {platform.machine()}, {os.cpu_count()} cores, shared with other "
        f"jobs. Whole run {total / 60:.1f} min.",
        "",
        "| rows | Django query log | wall s | embed s | rows/s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|",
        *(render_row(result) for result in results),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
