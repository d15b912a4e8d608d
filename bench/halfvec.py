"""
halfvec vs vector: what float16 storage saves and what it costs, at 100k rows.

    .venv/bin/python bench/halfvec.py [--rows 100000] [--queries 200] [--rounds 3] [--builds 3] [--no-write]

One run, two tables with the same rows: ``tests.searchapp.Headline``
(``EmbeddingField()``, pgvector ``vector``, HNSW on vector_cosine_ops) and
``tests.searchapp.HalfHeadline`` (``EmbeddingField(storage="halfvec")``,
HNSW on halfvec_cosine_ops), both m=16, ef_construction=64. Data and queries
are bench/read_path.py's (its generator is imported, not copied): clustered
synthetic 384-dim unit vectors, topic = i % 1000 zero-padded, so
``topic < "100"`` keeps 10%. The Headline rows are loaded by read_path's
``load_rows``; the HalfHeadline rows are the same rows cast in the database
(``embedding::halfvec``), the cast the worker's write makes.

Measured: table and HNSW index size, the HNSW build at the same
maintenance_work_mem (each index built ``--builds`` times, alternating, on 2
shared cores), p50/p95 of ``nearest(v, k=10, exact=False)`` unfiltered and at a
10% filter (the two tables alternate query by query, ``--rounds`` passes),
and recall@10 against exact numpy float32 cosine over the float32 vectors;
``exact=True`` on a subset shows what float16 alone loses.

Uses tests.settings with SEMANTIC_TEST_SLOT=6: a throwaway ``test_semantic_6``
database (dropped at the end, even on error) and Redis database 6. The table
goes to stdout and into BENCHMARKS.md's ``halfvec`` section.
"""

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import read_path  # noqa: E402  (sets the read path's environment, adjusted below)
from bench.report import elapsed_logger, write_section  # noqa: E402

# Its own test database (test_semantic_6) and Redis database, beside read_path's slot 5.
os.environ["SEMANTIC_TEST_SLOT"] = "6"

import numpy as np  # noqa: E402

K = read_path.K
FILTER = ("100", "10%")
MAINTENANCE_WORK_MEM = "1GB"  # as read_path.load_rows builds its index


def load_half(connection, log):
    """Fill searchapp_halfheadline from searchapp_headline, each vector cast to halfvec in the database.

    Returns the (name, definition) of its HNSW index, which is dropped for the load and built later.
    """
    from tests.searchapp.models import HalfHeadline, Headline

    vector_field, half_field = Headline._meta.get_field("embedding"), HalfHeadline._meta.get_field("embedding")
    # Same encoder, unchunked: the rows' hashes are valid in both tables.
    assert vector_field.fingerprint == half_field.fingerprint
    source, target = Headline._meta.db_table, HalfHeadline._meta.db_table
    with read_path.loader(connection) as db:
        index = read_path.hnsw_index(db, target)
        db.execute(f'DROP INDEX "{index[0]}"')
        start = time.perf_counter()
        db.execute(
            f'INSERT INTO "{target}" (id, title, topic, embedding, embedding_source_hash, embedding_vector_hash) '
            f"SELECT id, title, topic, embedding::{half_field.db_type(connection)}, embedding_source_hash, "
            f'embedding_vector_hash FROM "{source}"'
        )
        log(f"INSERT ... SELECT embedding::halfvec: {time.perf_counter() - start:.1f} s")
        db.execute(f'CREATE INDEX bench_halfheadline_topic ON "{target}" (topic)')
        db.execute(f'VACUUM ANALYZE "{target}"')
    return index


def build_index(db, table, definition):
    """Drop ``table``'s HNSW index if present, build ``definition``; seconds taken by the build."""
    current, _ = read_path.hnsw_index(db, table)
    if current:
        db.execute(f'DROP INDEX "{current}"')
    db.execute(f"SET maintenance_work_mem = '{MAINTENANCE_WORK_MEM}'")
    start = time.perf_counter()
    db.execute(definition)
    return time.perf_counter() - start


def sizes(db, table, index):
    table_bytes, index_bytes, vector_bytes = db.execute(
        f'SELECT pg_table_size(%s::regclass), pg_relation_size(%s::regclass), avg(pg_column_size(embedding)) FROM "{table}"',
        [table, index],
    ).fetchone()
    return {"table": table_bytes, "index": index_bytes, "vector": float(vector_bytes)}


def searches(models, queries, truth, filtered, exact, rounds):
    """Time ``nearest(q, k=10, exact=exact)`` on each model, alternating, ``rounds`` passes; recall from the last pass.

    Returns {name: summary with recall and rows}.
    """
    found = {}

    def search(name, queryset):
        def run(q):
            found[name, q.tobytes()] = list(queryset.nearest(q, k=K, exact=exact).values_list("pk", flat=True))

        return run

    variants = {}
    for name, model in models.items():
        queryset = model.objects.filter(topic__lt=FILTER[0]) if filtered else model.objects.all()
        variants[name] = search(name, queryset)
    timed = read_path.interleaved(variants, np.concatenate([queries] * rounds))
    for name in models:
        results = [found[name, q.tobytes()] for q in queries]
        timed[name]["recall"] = float(np.mean([len(set(pks) & expected) / K for pks, expected in zip(results, truth)]))
        timed[name]["rows"] = float(np.mean([len(set(pks)) for pks in results]))
        queryset = models[name].objects.filter(topic__lt=FILTER[0]) if filtered else models[name].objects.all()
        plan, _ = read_path.plan_of(queryset.nearest(queries[0], k=K, exact=exact))
        # read_path abbreviates the vector table's index scan; both tables' index names are the point here.
        timed[name]["plan"] = plan.replace("HNSW index scan", "Index Scan headline_embedding_hnsw")
    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=100, help="queries for the exact=True rows (a full scan each)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the queries, the tables alternating")
    parser.add_argument("--builds", type=int, default=3, help="HNSW builds of each index, alternating")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    began = time.perf_counter()
    log = elapsed_logger(began)

    import django

    django.setup()
    from django.conf import settings

    settings.DEBUG = False  # query logging would be charged to the searches
    from django.db import connection

    from tests.modelfactory import build_tiny_model

    # The test settings' aliases must load for migrate's checks.
    build_tiny_model(settings.TINY_MODEL_DIR, dimensions=settings.TINY_DIMENSIONS)
    old_name = connection.settings_dict["NAME"]
    log(f"creating test database for {old_name}")
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        results = run(args, log, connection)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    results["total_s"] = time.perf_counter() - began
    text = render(args, results)
    print(text)
    if not args.no_write:
        write_section("halfvec", text)
        print(f"\nwritten to {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


def run(args, log, connection):
    from tests.searchapp.models import HalfHeadline, Headline

    models = {"vector": Headline, "halfvec": HalfHeadline}
    tables = {name: model._meta.db_table for name, model in models.items()}
    results = {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT version(), (SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
            "current_setting('shared_buffers'), current_setting('max_parallel_maintenance_workers')"
        )
        results["server"] = cursor.fetchone()

    log(f"generating {args.rows} x {read_path.DIMENSIONS} vectors")
    vectors = read_path.clustered_vectors(args.rows, seed=1)
    queries = read_path.clustered_vectors(args.queries, seed=2)
    titles = read_path.short_texts(args.rows, seed=3)
    load = read_path.load_rows(connection, vectors, titles, log)
    builds = {"vector": [load["hnsw_s"]], "halfvec": []}
    # (name, definition) of each table's HNSW index, as its migration made it.
    indexes = {"vector": (Headline._meta.indexes[0].name, load["index_def"]), "halfvec": load_half(connection, log)}
    # Alternating builds: vector (in load_rows), halfvec, vector, halfvec, ...
    with read_path.loader(connection) as db:
        for name in ["halfvec"] + ["vector", "halfvec"] * (args.builds - 1):
            builds[name].append(build_index(db, tables[name], indexes[name][1]))
            log(f"HNSW build {name} ({indexes[name][1].split(' USING ')[1]}): {builds[name][-1]:.1f} s")
        for name in models:
            db.execute(f'ANALYZE "{tables[name]}"')
        results["sizes"] = {name: sizes(db, tables[name], indexes[name][0]) for name in models}
    results["builds"] = builds

    buckets = np.arange(args.rows) % read_path.BUCKETS
    truth_all = read_path.ground_truth(vectors, queries)
    truth_filtered = read_path.ground_truth(vectors, queries, buckets < int(FILTER[0]))
    sections = []
    log("unfiltered, exact=False")
    sections.append(("unfiltered, `exact=False`", searches(models, queries, truth_all, False, False, args.rounds)))
    log(f"filtered {FILTER[1]}, exact=False")
    sections.append((f"{FILTER[1]} filter, `exact=False`", searches(models, queries, truth_filtered, True, False, args.rounds)))
    subset = slice(0, args.exact_queries)
    log("unfiltered, exact=True")
    sections.append((
        f"unfiltered, `exact=True` (first {args.exact_queries} queries, 1 pass)",
        searches(models, queries[subset], truth_all[subset], False, True, 1),
    ))
    results["sections"] = sections
    return results


# --- output ---------------------------------------------------------------------


def megabytes(value):
    return f"{value / 2**20:.0f} MB"


def render(args, results):
    version, pgvector_version, shared_buffers, parallel = results["server"]
    sizes, builds = results["sizes"], results["builds"]
    v, h = sizes["vector"], sizes["halfvec"]
    fmt = read_path.fmt
    lines = [
        "## halfvec vs vector",
        "",
        f"`bench/halfvec.py --rows {args.rows} --queries {args.queries} --rounds {args.rounds} --builds {args.builds}`, "
        f"{datetime.date.today().isoformat()}. Two tables with the same {args.rows:,} rows x {read_path.DIMENSIONS} dims "
        "(bench/read_path.py's clustered synthetic unit vectors and short titles): `Headline` "
        "(`EmbeddingField()`, `vector`, HNSW `vector_cosine_ops`) and `HalfHeadline` "
        "(`EmbeddingField(storage=\"halfvec\")`, HNSW `halfvec_cosine_ops`; its rows are the same rows cast with "
        "`embedding::halfvec`, as the worker's write casts), both m=16, ef_construction=64. "
        f"{version.split(' on ')[0]}, pgvector {pgvector_version}, shared_buffers {shared_buffers}, "
        f"max_parallel_maintenance_workers {parallel}, maintenance_work_mem {MAINTENANCE_WORK_MEM}; "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, noisy. Whole run "
        f"{results['total_s'] / 60:.1f} min.",
        "",
        "| | vector (float32) | halfvec (float16) | halfvec / vector |",
        "|---|---:|---:|---:|",
        f"| table (heap + TOAST) | {megabytes(v['table'])} | {megabytes(h['table'])} | {h['table'] / v['table']:.2f} |",
        f"| HNSW index | {megabytes(v['index'])} | {megabytes(h['index'])} | {h['index'] / v['index']:.2f} |",
        f"| bytes per stored vector | {v['vector']:.0f} | {h['vector']:.0f} | {h['vector'] / v['vector']:.2f} |",
        f"| HNSW build, s ({args.builds} builds each, alternating) | {' / '.join(f'{s:.0f}' for s in builds['vector'])} | "
        f"{' / '.join(f'{s:.0f}' for s in builds['halfvec'])} | "
        f"{np.median(builds['halfvec']) / np.median(builds['vector']):.2f} (medians) |",
    ]
    for title, timed in results["sections"]:
        a, b = timed["vector"], timed["halfvec"]
        lines += [
            f"| **{title}**: p50 ms | {fmt(a['p50'], 2)} | {fmt(b['p50'], 2)} | {b['p50'] / a['p50']:.2f} |",
            f"| p95 ms | {fmt(a['p95'], 2)} | {fmt(b['p95'], 2)} | {b['p95'] / a['p95']:.2f} |",
            f"| recall@10 vs exact float32 | {a['recall']:.3f} | {b['recall']:.3f} | {b['recall'] / a['recall']:.3f} |",
            f"| rows returned (k=10) | {a['rows']:.1f} | {b['rows']:.1f} | |",
            f"| plan | {a['plan']} | {b['plan']} | |",
        ]
    lines += [
        "",
        "Latency: `Model.objects[.filter(topic__lt=\"100\")].nearest(v, k=10, exact=...).values_list(\"pk\", flat=True)` "
        "end to end through the ORM (default settings: ef_search 100, iterative relaxed_order), the two tables "
        f"alternating query by query over {args.rounds} passes ({args.queries * args.rounds} timed searches each). Recall@10 "
        "against exact numpy cosine over the float32 vectors (the filtered ones under the filter); the halfvec "
        "search also rounds the query to float16. *plan*: EXPLAIN ANALYZE of one query.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
