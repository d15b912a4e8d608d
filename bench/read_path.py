"""
Read-path benchmark: latency and recall@10 of the search strategies, the
ORM's overhead over the same raw SQL, and the cost of reranking.

    .venv/bin/python bench/read_path.py [--rows 100000] [--queries 200] [--no-write]

One run, one table (a script, not a timed test). Data: ``--rows`` clustered
synthetic 384-dim unit vectors (a few hundred centres plus anisotropic noise,
roughly calibrated to all-MiniLM-L6-v2 on the BBC headlines: nearest
neighbour cosine ~0.6, random pairs ~0.07) in ``tests.searchapp.Headline``,
which carries the project's HNSW index (m=16, ef_construction=64,
vector_cosine_ops). Real MiniLM vectors are not feasible here: encoding
runs at ~35 headlines/s on these CPUs, ~50 min for 100k rows. Row i has
bucket i % 1000, stored zero-padded in ``topic`` ("000".."999", a btree
index is added), so ``topic < "500"/"100"/"010"/"001"`` keeps 50%/10%/1%/0.1%.

Queries: ``--queries`` vectors from the same distribution (same centres);
ground truth by exact numpy cosine over the filtered rows.

Uses tests.settings with SEMANTIC_TEST_SLOT=5: a throwaway
``test_semantic_5`` database on the embedded PostgreSQL (dropped at the end,
even on error) and Redis database 5. The table goes to stdout and, between
markers, into BENCHMARKS.md at the repository root.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import elapsed_logger, write_section  # noqa: E402
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
# Its own test database (test_semantic_5) and Redis database: other test runs
# on the same PostgreSQL and Redis are not disturbed.
os.environ["SEMANTIC_TEST_SLOT"] = "5"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

DIMENSIONS = 384
BUCKETS = 1000
K = 10
SELECTIVITIES = [(500, "50%"), (100, "10%"), (10, "1%"), (1, "0.1%")]

WORDS = (
    "market bank shares profit growth economy oil prices government election minister party vote "
    "labour tax budget court police report film award music band album festival star actor "
    "game match cup team coach player league win record season injury phone mobile software "
    "internet broadband network users games console security virus online chart sales deal "
    "strike rail airline airport jobs firms rise fall warns plans new says talks bid boost"
).split()


# --- data ---------------------------------------------------------------------


def clustered_vectors(count, seed, clusters=300, alpha=0.35, noise=0.9, mean=0.35, data_seed=0):
    """Unit vectors around ``clusters`` centres with power-law (anisotropic) noise.

    The centres, the common offset and the spectrum come from ``data_seed``,
    so rows and queries drawn with different ``seed`` share them. With these
    defaults, on 2,225 vectors: nearest-neighbour cosine ~0.62, 10th ~0.31,
    random pairs ~0.05, 90% of the variance in ~230 dims (MiniLM on the
    2,225 BBC headlines: 0.60, 0.37, 0.07, 178 dims); isotropic noise would
    be much harder for HNSW than real embeddings are.
    """
    base = np.random.default_rng(data_seed)
    scale = np.arange(1, DIMENSIONS + 1) ** -alpha
    scale /= np.sqrt((scale**2).sum())
    offset = base.normal(size=DIMENSIONS)
    offset *= mean / np.linalg.norm(offset)
    centres = base.normal(size=(clusters, DIMENSIONS)) * scale
    rng = np.random.default_rng(seed)
    vectors = np.empty((count, DIMENSIONS), dtype=np.float32)
    for start in range(0, count, 20_000):
        n = min(20_000, count - start)
        block = offset + centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, DIMENSIONS)) * scale
        vectors[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def short_texts(count, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 11, size=count)
    return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


def loader(connection):
    """A psycopg connection of its own to ``connection``'s database (autocommit, pgvector types registered), for COPY and DDL."""
    import psycopg
    from pgvector.psycopg import register_vector

    settings = connection.settings_dict
    db = psycopg.connect(
        dbname=settings["NAME"], user=settings["USER"], host=settings["HOST"], port=settings["PORT"] or None,
        password=settings["PASSWORD"] or None, autocommit=True,
    )
    register_vector(db)
    return db


def hnsw_index(db, table):
    """(name, definition) of ``table``'s HNSW index ((None, None) when it has none)."""
    return db.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s AND indexdef ILIKE '%%USING hnsw%%'", [table]
    ).fetchone() or (None, None)


def load_rows(connection, vectors, titles, log):
    """COPY the rows into searchapp_headline (binary, fresh hashes), then build the indexes."""
    from tests.searchapp.models import Headline

    field = Headline._meta.get_field("embedding")
    table = Headline._meta.db_table
    start = time.perf_counter()
    hashes = [field.compute_source_hash(Headline(title=title)) for title in titles]
    log(f"hashes: {time.perf_counter() - start:.1f} s")

    with loader(connection) as db:
        index_def = hnsw_index(db, table)
        assert index_def[0], f"no HNSW index on {table}"
        # An HNSW index is built far faster in one go than row by row.
        db.execute(f'DROP INDEX "{index_def[0]}"')
        start = time.perf_counter()
        with db.cursor() as cursor:
            with cursor.copy(
                f'COPY "{table}" (id, title, topic, embedding, embedding_source_hash, embedding_vector_hash) '
                "FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "varchar", "varchar", "vector", "varchar", "varchar"])
                for i, (vector, title, row_hash) in enumerate(zip(vectors, titles, hashes)):
                    copy.write_row((i + 1, title, f"{i % BUCKETS:03d}", vector, row_hash, row_hash))
        db.execute(f"SELECT setval(pg_get_serial_sequence('\"{table}\"', 'id'), %s)", [len(vectors)])
        copy_seconds = time.perf_counter() - start
        log(f"COPY {len(vectors)} rows: {copy_seconds:.1f} s")
        start = time.perf_counter()
        db.execute("SET maintenance_work_mem = '1GB'")
        db.execute(index_def[1])
        hnsw_seconds = time.perf_counter() - start
        log(f"HNSW build ({index_def[1].split(' USING ')[1]}): {hnsw_seconds:.1f} s")
        db.execute(f'CREATE INDEX bench_headline_topic ON "{table}" (topic)')
        db.execute(f'VACUUM ANALYZE "{table}"')
        size = db.execute(
            "SELECT pg_size_pretty(pg_table_size(%s::regclass)), pg_size_pretty(pg_relation_size(%s::regclass))",
            [table, index_def[0]],
        ).fetchone()
    return {"copy_s": copy_seconds, "hnsw_s": hnsw_seconds, "index_def": index_def[1], "table_size": size[0], "index_size": size[1]}


def ground_truth(vectors, queries, keep=None):
    """Top-K row ids (1-based) by exact cosine, over the rows where ``keep``."""
    ids = np.arange(1, len(vectors) + 1)
    if keep is not None:
        vectors, ids = vectors[keep], ids[keep]
    scores = queries @ vectors.T
    if len(ids) <= K:
        return [set(ids.tolist()) for _ in queries]
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    return [set(ids[row].tolist()) for row in top]


# --- chunked documents --------------------------------------------------------


def chunked_vectors(documents, seed, chunks_per_document=(2, 6)):
    """Chunk vectors of ``documents`` documents: 2-6 chunks each (mean ~4) around the document's own centre.

    The centres are clustered_vectors(); each chunk is its centre plus noise
    (cosine to the centre ~0.8), as the passages of one article resemble
    each other more than other articles. Returns (owner index per chunk,
    chunk index within its owner, chunk vectors).
    """
    rng = np.random.default_rng(seed)
    centres = clustered_vectors(documents, seed=seed)
    counts = rng.integers(chunks_per_document[0], chunks_per_document[1] + 1, size=documents)
    owners = np.repeat(np.arange(documents), counts)
    positions = np.concatenate([np.arange(n) for n in counts])
    vectors = centres[owners] + rng.normal(scale=0.75 / np.sqrt(DIMENSIONS), size=(len(owners), DIMENSIONS))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return owners, positions, vectors.astype(np.float32)


def load_chunked(connection, owners, positions, vectors, log):
    """COPY documents and their chunks into testapp's ChunkedHeadline, then build the chunk table's HNSW index.

    The index is the one its migrations made, with the field's build
    parameters (``field.chunk_index``: m and ef_construction).
    """
    from tests.testapp.models import ChunkedHeadline

    field = ChunkedHeadline._meta.get_field("embedding")
    table, chunk_table = ChunkedHeadline._meta.db_table, field.chunk_model._meta.db_table
    params = field.chunk_index
    documents = int(owners.max()) + 1
    titles = short_texts(documents, seed=5)
    hashes = [field.compute_source_hash(ChunkedHeadline(title=title)) for title in titles]
    row_vectors = np.zeros((documents, DIMENSIONS), dtype=np.float32)
    np.add.at(row_vectors, owners, vectors)
    row_vectors /= np.linalg.norm(row_vectors, axis=1, keepdims=True)
    with loader(connection) as db:
        index_def = hnsw_index(db, chunk_table)
        # The migrations build what the field says (else makemigrations is due).
        for name, value in params.items():
            assert f"{name}='{value}'" in index_def[1], f"{chunk_table}'s index is not {params}: {index_def[1]}"
        db.execute(f'DROP INDEX "{index_def[0]}"')
        start = time.perf_counter()
        with db.cursor() as cursor:
            with cursor.copy(
                f'COPY "{table}" (id, title, topic, embedding, embedding_source_hash, embedding_vector_hash) FROM STDIN WITH (FORMAT BINARY)'
            ) as copy:
                copy.set_types(["int8", "varchar", "varchar", "vector", "varchar", "varchar"])
                for i in range(documents):
                    copy.write_row((i + 1, titles[i], f"{i % BUCKETS:03d}", row_vectors[i], hashes[i], hashes[i]))
            with cursor.copy(
                f'COPY "{chunk_table}" (owner_id, "index", start, "end", text, text_hash, embedding) FROM STDIN WITH (FORMAT BINARY)'
            ) as copy:
                copy.set_types(["int8", "int4", "int4", "int4", "text", "varchar", "vector"])
                for owner, position, vector in zip(owners, positions, vectors):
                    copy.write_row((int(owner) + 1, int(position), 0, 1, f"chunk {position}", f"bench-{owner}-{position}", vector))
        copy_seconds = time.perf_counter() - start
        log(f"COPY {documents} documents, {len(owners)} chunks: {copy_seconds:.1f} s")
        db.execute("SET maintenance_work_mem = '2GB'")
        start = time.perf_counter()
        db.execute(index_def[1])
        hnsw_seconds = time.perf_counter() - start
        log(f"chunk HNSW build (m={params['m']}, ef_construction={params['ef_construction']}): {hnsw_seconds:.1f} s")
        db.execute(f'CREATE INDEX bench_chunked_topic ON "{table}" (topic)')
        db.execute(f'VACUUM ANALYZE "{table}"')
        db.execute(f'VACUUM ANALYZE "{chunk_table}"')
        sizes = db.execute(
            "SELECT pg_size_pretty(pg_table_size(%s::regclass)), pg_size_pretty(pg_relation_size(%s::regclass))",
            [chunk_table, index_def[0]],
        ).fetchone()
    return {"copy_s": copy_seconds, "hnsw_s": hnsw_seconds, "chunk_table_size": sizes[0], "chunk_index_size": sizes[1], "params": params}


def best_chunk_truth(owners, vectors, queries, keep_documents=None):
    """Top-K document ids (1-based) by their best chunk's exact cosine, over the kept documents."""
    truth = []
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    for query in queries:
        best = np.maximum.reduceat(vectors @ query, starts)
        if keep_documents is not None:
            best = np.where(keep_documents, best, -np.inf)
        top = np.argpartition(-best, K)[:K]
        truth.append({int(i) + 1 for i in top if np.isfinite(best[i])})
    return truth


def chunked_search(args, log, connection):
    """The chunked table at the same size: exact, index path and auto, unfiltered and filtered at 10% and 1%."""
    from semantic.retrieval import estimates
    from tests.testapp.models import ChunkedHeadline

    log(f"generating chunks for {args.rows} documents")
    owners, positions, vectors = chunked_vectors(args.rows, seed=11)
    queries = clustered_vectors(args.queries, seed=12)
    load = load_chunked(connection, owners, positions, vectors, log)
    estimates.forget_table_statistics()
    documents = np.arange(args.rows)
    sections = []
    plans = {}
    for label, kept in (("unfiltered", None), ("10%", 100), ("1%", 10)):
        keep = None if kept is None else (documents % BUCKETS) < kept
        truth = best_chunk_truth(owners, vectors, queries, keep)
        base = ChunkedHeadline.objects.all() if kept is None else ChunkedHeadline.objects.filter(topic__lt=f"{kept:03d}")
        rows = []
        modes = [("exact (exact=True)", dict(exact=True)), ("index path (exact=False)", dict(exact=False)),
                 ("auto (exact=None)", dict())]
        if kept is None:
            # Recall against ef_search: the chunk index holds ~4x the vectors of the row index.
            modes += [(f"index path, ef_search={ef}", dict(exact=False, ef_search=ef)) for ef in (40, 200, 400)]
        for name, options in modes:
            log(f"chunked {label}: {name}")
            make = lambda q, options=options: base.nearest(q, k=K, **options)  # noqa: E731
            stats = measure_search(make, queries, truth, warmup=2, budget_s=args.budget, minimum=20)
            if not options:
                chosen = make(queries[0]).search_settings()
                name = f"auto -> {'exact' if chosen == {'enable_indexscan': 'off'} else 'index'}"
            stats["plan"], stats["jit"] = plan_of(make(queries[0]))
            rows.append((name, stats))
            if options.get("exact") is False:
                plans[label] = make(queries[0]).explain(analyze=True)
        sections.append((label, int(len(documents) if keep is None else keep.sum()), rows))
    # The ratio to the row-vector search, measured side by side (query by
    # query, alternating), not minutes apart on a shared machine.
    from tests.searchapp.models import Headline

    log("chunked vs row-vector index search, interleaved")
    pair = interleaved(
        {
            "row vectors": lambda q: list(Headline.objects.nearest(q, k=K, exact=False).values_list("pk", "distance")),
            "chunks": lambda q: list(ChunkedHeadline.objects.nearest(q, k=K, exact=False).values_list("pk", "distance")),
            "chunks, default call: instances with best_chunk": lambda q: [row.best_chunk for row in ChunkedHeadline.objects.nearest(q, k=K)],
        },
        queries,
    )
    return {"load": load, "chunks": len(owners), "sections": sections, "plans": plans, "pair": pair}


def render_chunked(chunked, args):
    load = chunked["load"]
    lines = [
        "### Chunked documents at the same size",
        "",
        f"{args.rows:,} documents x 2-6 chunks (mean ~4): {chunked['chunks']:,} chunk vectors of {DIMENSIONS} dims, each "
        "its document's centre (the same clustered distribution) plus noise (cosine to the centre ~0.8), in "
        "`tests.testapp.ChunkedHeadline`. The chunk table carries the field's HNSW index (its `chunk_index`: "
        f"m={load['params']['m']}, ef_construction={load['params']['ef_construction']}, built in {load['hnsw_s']:.0f} s "
        f"with maintenance_work_mem 2GB; table {load['chunk_table_size']}, index {load['chunk_index_size']}). "
        "Ground truth: each document's best chunk by exact numpy cosine, top 10 documents. *rows*: distinct documents "
        "returned (k=10 asked).",
        "",
        "| search | p50 ms | p95 ms | rows | recall@10 | plan |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, kept, rows in chunked["sections"]:
        lines.append(f"| **{label} ({kept:,} documents)** | | | | | |")
        for name, s in rows:
            lines.append(f"| {name} | {fmt(s['p50'], 1)} | {fmt(s['p95'], 1)} | {s['rows']:.1f} | {s['recall']:.3f} | {s['plan']} |")
    pair = chunked["pair"]
    row_p50 = pair["row vectors"]["p50"]
    lines += [
        "",
        f"Index path over chunks against the row-vector HNSW search at the same size ({args.rows:,} rows, the table above): "
        "`nearest(v, k=10, exact=False).values_list('pk', 'distance')` both, ef_search=100, and the default call "
        "returning instances with their best chunk; interleaved query by query (goal <= 3x):",
        "",
        "| search | p50 ms | p95 ms | / row vectors | paired / row vectors |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {fmt(s['p50'], 2)} | {fmt(s['p95'], 2)} | {s['p50'] / row_p50:.2f}x | **{paired_ratio(s, pair['row vectors']):.2f}x** |"
          for name, s in pair.items()],
        "",
        "EXPLAIN ANALYZE of one unfiltered index-path query (the query vector elided):",
        "",
        "```",
        *[line for line in chunked["plans"]["unfiltered"].splitlines() if not line.strip().startswith("Order By")],
        "```",
        "",
    ]
    return lines


# --- measuring ------------------------------------------------------------------


def ms(seconds):
    return seconds * 1000.0


def summarise(times, rows=None, recalls=None, unsorted=None):
    times = np.asarray(times)
    result = {"p50": ms(np.percentile(times, 50)), "p95": ms(np.percentile(times, 95)), "mean": ms(times.mean())}
    if rows is not None:
        result["rows"] = float(np.mean(rows))
    if recalls is not None:
        result["recall"] = float(np.mean(recalls))
    if unsorted is not None:
        result["unsorted"] = int(np.sum(unsorted))
    result["n"] = len(times)
    return result


def measure_search(make_queryset, queries, truth, warmup=3, budget_s=None, minimum=40):
    """Time ``list(make_queryset(q).values_list("pk", "distance"))`` per query; recall against ``truth``.

    With ``budget_s``, stops after that many seconds once ``minimum`` queries ran.
    """
    for q in queries[:warmup]:
        list(make_queryset(q).values_list("pk", "distance"))
    times, rows, recalls, unsorted = [], [], [], []
    began = time.perf_counter()
    for q, expected in zip(queries, truth):
        if budget_s and len(times) >= minimum and time.perf_counter() - began > budget_s:
            break
        start = time.perf_counter()
        found = list(make_queryset(q).values_list("pk", "distance"))
        times.append(time.perf_counter() - start)
        rows.append(len(found))
        recalls.append(len({pk for pk, _ in found} & expected) / max(len(expected), 1))
        distances = [d for _, d in found]
        unsorted.append(distances != sorted(distances))
    return summarise(times, rows, recalls, unsorted)


def plan_of(queryset):
    """(short plan description, JIT ms or None) from one EXPLAIN ANALYZE under the search's settings."""
    plan = json.loads(queryset.values_list("pk", "distance").explain(format="json", analyze=True))[0]
    names = []

    def walk(node):
        kind = node["Node Type"]
        if node.get("Index Name"):
            kind += f" {node['Index Name']}"
        if kind not in names and node["Node Type"] not in ("Limit", "Result"):
            names.append(kind)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    jit = plan.get("JIT", {}).get("Timing", {}).get("Total")
    short = " > ".join(names).replace("searchapp_", "").replace("Index Scan headline_embedding_hnsw", "HNSW index scan")
    return short, jit


def interleaved(variants, queries, warmup=3):
    """Time each variant on each query, rotating the order per query (fair under noise)."""
    names = list(variants)
    for q in queries[:warmup]:
        for name in names:
            variants[name](q)
    times = {name: [] for name in names}
    for i, q in enumerate(queries):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name](q)
            times[name].append(time.perf_counter() - start)
    # The samples too: a ratio of two variants is steadier as the median of
    # each query's own ratio than as a ratio of medians on a shared machine.
    return {name: {**summarise(values), "samples": values} for name, values in times.items()}


def paired_ratio(variant, baseline):
    """Median over queries of variant time / baseline time on the same query (both from ``interleaved``)."""
    return float(np.median(np.asarray(variant["samples"]) / np.asarray(baseline["samples"])))


def time_each(fn, args_list, repeat=1):
    """Time fn(*args) for each args; p50/p95/mean."""
    times = []
    for args in args_list:
        for _ in range(repeat):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    return summarise(times)


# --- the benchmark ----------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rerank-queries", type=int, default=20)
    parser.add_argument("--budget", type=float, default=15.0,
                        help="seconds per search configuration; a slow one stops early (after at least 40 queries)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--chunked", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure a chunked table of --rows documents x ~4 chunks")
    args = parser.parse_args()
    began = time.perf_counter()
    log = elapsed_logger(began)

    import django

    django.setup()
    from django.conf import settings

    # Query logging (DEBUG=True in the project) would be charged to the ORM.
    settings.DEBUG = False
    from django.db import connection, transaction
    from django.test.utils import override_settings
    from pgvector import Vector

    from semantic.retrieval.query_vectors import embed_query
    from semantic.retrieval.session import search_settings
    from semantic.rerank import get_reranker
    from tests.modelfactory import build_tiny_cross_encoder, build_tiny_model
    from tests.searchapp.models import Headline

    build_tiny_model(settings.TINY_MODEL_DIR, dimensions=settings.TINY_DIMENSIONS)
    cross_encoder_dir = build_tiny_cross_encoder(settings.TEST_MODEL_DIR / "tiny-cross-encoder-32")
    override = override_settings(SEMANTIC={**settings.SEMANTIC, "RERANKER": str(cross_encoder_dir)})
    override.enable()

    old_name = connection.settings_dict["NAME"]
    log(f"creating test database for {old_name}")
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        results = run(args, log, connection, transaction, Vector, search_settings, embed_query, get_reranker, Headline)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        override.disable()
    results["total_s"] = time.perf_counter() - began
    text = render(args, results)
    print(text)
    if not args.no_write:
        write_section("read_path", text)
        print(f"\nwritten to {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


def run(args, log, connection, transaction, Vector, search_settings, embed_query, get_reranker, Headline):
    from semantic.conf import semantic_settings

    results = {"sections": []}
    with connection.cursor() as cursor:
        cursor.execute("SELECT version(), (SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                       "current_setting('shared_buffers'), current_setting('jit')")
        results["server"] = cursor.fetchone()

    log(f"generating {args.rows} x {DIMENSIONS} vectors")
    vectors = clustered_vectors(args.rows, seed=1)
    queries = clustered_vectors(args.queries, seed=2)
    titles = short_texts(args.rows, seed=3)
    results["load"] = load_rows(connection, vectors, titles, log)
    buckets = np.arange(args.rows) % BUCKETS

    truth_all = ground_truth(vectors, queries)
    base = Headline.objects.all()

    # 1. Unfiltered: HNSW at several ef_search, and the exact scan.
    rows = []
    for ef in (10, 40, 100, 200):
        log(f"unfiltered HNSW ef_search={ef}")
        make = lambda q, ef=ef: base.nearest(q, k=K, exact=False, ef_search=ef)  # noqa: E731
        stats = measure_search(make, queries, truth_all, budget_s=args.budget)
        stats["plan"], stats["jit"] = plan_of(make(queries[0]))
        rows.append((f"HNSW, ef_search={ef}" + (" (pgvector default)" if ef == 40 else " (semantic default)" if ef == 100 else ""), stats))
    log("unfiltered exact")
    make = lambda q: base.nearest(q, k=K, exact=True)  # noqa: E731
    stats = measure_search(make, queries, truth_all, budget_s=args.budget)
    stats["plan"], stats["jit"] = plan_of(make(queries[0]))
    rows.append(("exact scan (exact=True)", stats))
    results["sections"].append(("Unfiltered, k=10", rows))

    # 2. Filtered at four selectivities, four strategies each.
    for kept, label in SELECTIVITIES:
        keep = buckets < kept
        truth = ground_truth(vectors, queries, keep)
        filtered = base.filter(topic__lt=f"{kept:03d}")
        modes = {
            "HNSW, no iterative scan": dict(exact=False, iterative_scan="off"),
            "HNSW, iterative relaxed_order": dict(exact=False, iterative_scan="relaxed_order"),
            "exact (exact=True)": dict(exact=True),
            "auto (exact=None)": dict(exact=None),
        }
        rows = []
        for name, options in modes.items():
            log(f"filtered {label}: {name}")
            make = lambda q, options=options: filtered.nearest(q, k=K, **options)  # noqa: E731
            stats = measure_search(make, queries, truth, budget_s=args.budget)
            stats["plan"], stats["jit"] = plan_of(make(queries[0]))
            if options["exact"] is None:
                probe = make(queries[0])
                chose = "exact" if probe.search_settings() == {"enable_indexscan": "off"} else "index"
                name = f"auto (exact=None) -> {chose}, estimate {estimated_rows(probe):,.0f} rows"
            rows.append((name, stats))
        results["sections"].append((f"Filtered to {label} ({int(keep.sum()):,} rows), k=10", rows))

    # 3. ORM vs the same raw SQL, under the same settings.
    results["orm"] = orm_versus_raw(args, log, connection, transaction, Vector, search_settings, Headline, queries)

    # 4. Rerank cost at N = 20/50/100 candidates (tiny cross-encoder).
    results["rerank"] = rerank_cost(args, log, embed_query, get_reranker, Headline, semantic_settings)

    # 5. Text queries: the query-embedding caches.
    results["text"] = text_query_cost(log, Headline)

    # 6. Chunked documents at the same size: the index path over chunks.
    if args.chunked:
        results["chunked"] = chunked_search(args, log, connection)
    return results


def estimated_rows(queryset):
    from semantic.retrieval.chunks import row_filters
    from semantic.retrieval.estimates import planned_rows

    return planned_rows(queryset.db, row_filters(queryset.query))


def orm_versus_raw(args, log, connection, transaction, Vector, search_settings, Headline, queries):
    from semantic.retrieval.session import set_local

    table = Headline._meta.db_table
    # (queryset, options, topic filter, queries, full set of variants?)
    workloads = {
        "unfiltered, the default call (auto: HNSW, ef_search=100 from the connection)": (Headline.objects.all(), dict(), None, queries, True),
        "filtered 1%, exact": (Headline.objects.filter(topic__lt="010"), dict(exact=True), "010", queries, True),
        "unfiltered exact scan": (Headline.objects.all(), dict(exact=True), None, queries[:20], False),
    }
    out = {}
    for workload, (base, options, topic, workload_queries, full) in workloads.items():
        log(f"ORM vs raw: {workload}")
        template = base.nearest(queries[0], k=K, **options)
        settings_values = template.search_settings()
        orm_sql, orm_params = template.query.sql_with_params()
        # The ORM's own SQL, parameters rebuilt per query as a caller would.
        vector_positions = [i for i, p in enumerate(orm_params) if isinstance(p, str) and p.startswith("[")]
        where = " WHERE topic < %s AND embedding IS NOT NULL" if topic else " WHERE embedding IS NOT NULL"
        minimal_sql = f'SELECT id, embedding <=> %s AS distance FROM "{table}"{where} ORDER BY distance LIMIT {K}'

        def raw_minimal(q):
            params = [Vector(q).to_text()] + ([topic] if topic else [])
            with search_settings("default", settings_values), connection.cursor() as cursor:
                    cursor.execute(minimal_sql, params)
                    return cursor.fetchall()

        def raw_minimal_no_settings(q):
            params = [Vector(q).to_text()] + ([topic] if topic else [])
            with connection.cursor() as cursor:
                if options.get("exact"):
                    # Exact needs its setting: session SET before, RESET after (no transaction block).
                    cursor.execute("SET enable_indexscan = off")
                cursor.execute(minimal_sql, params)
                rows = cursor.fetchall()
                if options.get("exact"):
                    cursor.execute("RESET enable_indexscan")
                return rows

        score_sql = minimal_sql.replace(" AS distance", " AS distance, 1.0 - (embedding <=> %s) AS score")

        def raw_with_score(q):
            text = Vector(q).to_text()
            params = [text, text] + ([topic] if topic else [])
            with search_settings("default", settings_values), connection.cursor() as cursor:
                    cursor.execute(score_sql, params)
                    return cursor.fetchall()

        def raw_orm_sql(q):
            text = Vector(q).to_text()
            params = [text if i in vector_positions else p for i, p in enumerate(orm_params)]
            with search_settings("default", settings_values), connection.cursor() as cursor:
                    cursor.execute(orm_sql, params)
                    return cursor.fetchall()

        variants = {
            "raw SQL: id, distance (settings as the ORM applies them)": raw_minimal,
            "raw SQL: the ORM's SELECT, all columns (settings as the ORM applies them)": raw_orm_sql,
            "raw SQL: id, distance, 1 - (embedding <=> q) AS score (settings as the ORM applies them)": raw_with_score,
            "raw SQL: id, distance, autocommit, no SET LOCAL": raw_minimal_no_settings,
            "ORM: model instances": lambda q: list(base.nearest(q, k=K, **options)),
            "ORM: values_list('pk', 'distance')": lambda q: list(base.nearest(q, k=K, **options).values_list("pk", "distance")),
            "ORM: instances with the vector loaded (.defer(None))": lambda q: list(base.nearest(q, k=K, **options).defer(None)),
            "ORM: instances, exact=False (forces the index: SET LOCAL in a transaction)": lambda q: list(base.nearest(q, k=K, exact=False)),
        }
        if not full:
            keep = ("raw SQL: id, distance (settings as the ORM applies them)", "raw SQL: the ORM's SELECT, all columns (settings as the ORM applies them)",
                    "raw SQL: id, distance, 1 - (embedding <=> q) AS score (settings as the ORM applies them)",
                    "ORM: values_list('pk', 'distance')")
            variants = {name: fn for name, fn in variants.items() if name in keep}
        timed = interleaved(variants, workload_queries, warmup=2 if full else 1)

        # How many times the scan computes the distance per row, from EXPLAIN VERBOSE of the ORM's SQL.
        with search_settings("default", settings_values), connection.cursor() as cursor:
            cursor.execute("EXPLAIN (VERBOSE, FORMAT JSON) " + orm_sql, orm_params)
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
        node = plan[0]["Plan"]
        while node.get("Plans") and node["Node Type"] not in ("Seq Scan", "Index Scan", "Bitmap Heap Scan"):
            node = node["Plans"][0]
        scan_distances = sum(item.count("<=>") for item in node.get("Output", []))
        data = {"timed": timed, "settings": settings_values, "scan": (node["Node Type"], scan_distances),
                "queries": len(workload_queries)}
        if not full:
            out[workload] = data
            continue

        # Where the ORM's time goes, piece by piece (medians over the queries).
        def build(q):
            return base.nearest(q, k=K, **options)

        built = [build(q) for q in queries]
        pieces = {
            "build the QuerySet (filter/annotate/order/slice)": time_each(build, [(q,) for q in queries]),
            "compile SQL (as_sql)": time_each(lambda qs: qs.query.get_compiler(qs.db).as_sql(), [(qs,) for qs in built]),
            "search_settings() (table statistics, cached; EXPLAIN only when filtered)": time_each(lambda qs: qs.search_settings(), [(qs,) for qs in built]),
            "planner estimate of a filtered search: EXPLAIN round trip": time_each(estimated_rows, [(qs,) for qs in built]),
        }

        def txn_only():
            with transaction.atomic():
                set_local(connection, settings_values)

        pieces["atomic() + set_config round trip + COMMIT"] = time_each(txn_only, [()] * len(queries))
        raw_rows = [raw_orm_sql(q) for q in queries[:50]]
        # Search results leave the vector column out (it is deferred).
        names = ["id", "title", "topic", "embedding_source_hash", "embedding_vector_hash"]

        def instantiate(rows):
            for row in rows:
                obj = Headline.from_db("default", names, list(row[:5]))
                obj.distance, obj.score = row[5], row[6]

        pieces["Model.from_db + set annotations, 10 rows"] = time_each(instantiate, [(r,) for r in raw_rows])
        pieces["Vector(q).to_text() of the query (raw SQL pays it too)"] = time_each(
            lambda q: Vector(q).to_text(), [(q,) for q in queries]
        )
        data["pieces"] = pieces
        out[workload] = data
    return out


def rerank_cost(args, log, embed_query, get_reranker, Headline, semantic_settings):
    import torch

    field = Headline._meta.get_field("embedding")
    texts = short_texts(args.rerank_queries, seed=4)
    log(f"rerank: loading MiniLM, embedding {len(texts)} query texts, loading the cross-encoder")
    for text in texts:
        embed_query(field, text)  # query vectors cached in-process: encoding is not part of what follows
    reranker = get_reranker()
    reranker.score("warm up", ["a text", "another text"])
    default_threads = torch.get_num_threads()

    def threads(n, fn):
        def run(t):
            torch.set_num_threads(n)
            return fn(t)

        return run

    rows = []
    for n in (20, 50, 100):
        log(f"rerank N={n}")
        search = lambda t, n=n: list(Headline.objects.semantic_search(t, k=n, exact=False))  # noqa: E731
        reranked = lambda t, n=n: list(  # noqa: E731
            Headline.objects.semantic_search(t, k=10, exact=False, rerank=True, candidates=n)
        )
        candidates = {t: [row.title for row in search(t)] for t in texts}
        score_only = lambda t: reranker.score(t, candidates[t])  # noqa: E731
        variants = {"search": threads(default_threads, search)}
        for count in sorted({default_threads, 1}, reverse=True):
            variants[f"rerank {count}"] = threads(count, reranked)
            variants[f"score {count}"] = threads(count, score_only)
        timed = interleaved(variants, texts)
        rows.append((n, timed))
    torch.set_num_threads(default_threads)
    return {"rows": rows, "batch_size": reranker.batch_size, "device": reranker.device, "threads": default_threads}


def text_query_cost(log, Headline):
    from semantic.retrieval.query_vectors import forget_query_vectors

    """semantic_search(text): a new text (encode), a text in Redis only, a text seen by this process."""
    nonce = f"{time.time_ns():x}"
    texts = [f"{t} {nonce}" for t in short_texts(20, seed=5)]
    run = lambda t: list(Headline.objects.semantic_search(t, k=K, exact=False))  # noqa: E731
    log("text queries")
    run("warm up " + nonce)
    cold, redis_hit, process_hit = [], [], []
    for t in texts:
        start = time.perf_counter()
        run(t)
        cold.append(time.perf_counter() - start)
    for t in texts:
        forget_query_vectors()
        start = time.perf_counter()
        run(t)
        redis_hit.append(time.perf_counter() - start)
    for t in texts:
        run(t)
        start = time.perf_counter()
        run(t)
        process_hit.append(time.perf_counter() - start)
    return {"new text (MiniLM encode)": summarise(cold), "seen before, Redis hit": summarise(redis_hit),
            "seen by this process": summarise(process_hit)}


# --- output ---------------------------------------------------------------------------


def fmt(value, digits=1):
    return "—" if value is None else f"{value:.{digits}f}"


def render(args, results):
    load = results["load"]
    version, pgvector_version, shared_buffers, jit = results["server"]
    lines = [
        "## Read path",
        "",
        f"`bench/read_path.py --rows {args.rows} --queries {args.queries}`, "
        f"{datetime.date.today().isoformat()}. {args.rows:,} rows x {DIMENSIONS} dims "
        f"(clustered synthetic unit vectors, roughly calibrated to MiniLM), {args.queries} query vectors, k={K}. "
        f"{version.split(' on ')[0]}, pgvector {pgvector_version}, shared_buffers {shared_buffers}, jit {jit}; "
        f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs, noisy: "
        "compare rows within this run, not across runs.",
        "",
        f"Load: COPY {load['copy_s']:.0f} s; HNSW build {load['hnsw_s']:.0f} s at maintenance_work_mem=1GB "
        f"(`{load['index_def'].split(' USING ')[1]}`, m=16, ef_construction=64 by default); "
        f"table {load['table_size']}, index {load['index_size']}. Whole run {results['total_s'] / 60:.1f} min.",
        "",
        "Latency is per query, end to end through the ORM "
        "(`Headline.objects[.filter(topic__lt=...)].nearest(v, k=10, ...).values_list('pk', 'distance')`, "
        "settings applied with SET LOCAL in the query's transaction). Recall@10 against exact numpy cosine "
        "over the filtered rows (of all of them when fewer than 10 pass). *rows*: mean rows returned (k=10 asked). *unsorted*: queries whose rows "
        "came back out of distance order.",
        "",
        "| search | p50 ms | p95 ms | rows | recall@10 | unsorted | plan (EXPLAIN ANALYZE of one query) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for title, rows in results["sections"]:
        lines.append(f"| **{title}** | | | | | | |")
        for name, s in rows:
            plan = s["plan"] + (f"; JIT {s['jit']:.0f} ms" if s.get("jit") else "")
            sample = "" if s["n"] == args.queries else f" (first {s['n']} queries: time budget)"
            lines.append(
                f"| {name}{sample} | {fmt(s['p50'])} | {fmt(s['p95'])} | {s['rows']:.1f} | {s['recall']:.3f} | {s['unsorted']} | {plan} |"
            )

    lines += ["", "### ORM vs raw SQL", "",
              "Same table, same query vector, same SET LOCAL settings; the variants alternate query by query. "
              "Goal: ORM <= 1.3x raw.", ""]
    for workload, data in results["orm"].items():
        timed = data["timed"]
        raw = timed["raw SQL: id, distance (settings as the ORM applies them)"]["p50"]
        same = timed["raw SQL: the ORM's SELECT, all columns (settings as the ORM applies them)"]
        scan, distances = data["scan"]
        lines += [f"**{workload}** ({data['queries']} queries; settings {data['settings']}; the ORM's SQL computes "
                  f"the distance {distances}x per row in its {scan}). *Paired*: the median of each query's own "
                  "ratio to the raw same SELECT, run next to it (steadier than a ratio of medians under load).", "",
                  "| variant | p50 ms | p95 ms | / raw id,distance | / raw same SELECT | paired / raw same SELECT |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in timed.items():
            lines.append(f"| {name} | {fmt(s['p50'], 2)} | {fmt(s['p95'], 2)} | {s['p50'] / raw:.2f}x | "
                         f"{s['p50'] / same['p50']:.2f}x | **{paired_ratio(s, same):.2f}x** |")
        if "pieces" in data:
            lines += ["", "| piece of the ORM call | p50 ms |", "|---|---:|"]
            for name, s in data["pieces"].items():
                lines.append(f"| {name} | {fmt(s['p50'], 3)} |")
        lines.append("")

    rerank = results["rerank"]
    lines += ["### Rerank cost", "",
              f"`semantic_search(text, k=10, rerank=True, candidates=N, exact=False)` vs the same search returning N "
              f"rows without rerank; {args.rerank_queries} short texts (5-10 words; query vectors cached, so no "
              f"bi-encoder cost). Cross-encoder: the **tiny random 2-layer, 32-dim test model** on "
              f"{rerank['device']}, batch {rerank['batch_size']}; a real cross-encoder (e.g. ms-marco-MiniLM-L-6, "
              "384-dim, 6 layers) costs far more per pair. Torch threads: its default "
              f"({rerank['threads']}, one per core) and 1; the cores are shared with PostgreSQL and other jobs.", "",
              "| N | torch threads | search N rows p50 ms | search + rerank p50 ms | p95 ms | rerank cost p50 ms | score() alone p50 ms | per candidate ms |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, timed in rerank["rows"]:
        s = timed["search"]
        for count in sorted({rerank["threads"], 1}, reverse=True):
            r, sc = timed[f"rerank {count}"], timed[f"score {count}"]
            lines.append(f"| {n} | {count} | {fmt(s['p50'], 2)} | {fmt(r['p50'], 2)} | {fmt(r['p95'], 2)} | "
                         f"{fmt(r['p50'] - s['p50'], 2)} | {fmt(sc['p50'], 2)} | {sc['p50'] / n:.3f} |")
    lines += ["", "### Text queries (`semantic_search(text, k=10, exact=False)`, real MiniLM on CPU)", "",
              "| query text | p50 ms | p95 ms |", "|---|---:|---:|"]
    for name, s in results["text"].items():
        lines.append(f"| {name} | {fmt(s['p50'], 2)} | {fmt(s['p95'], 2)} |")
    if results.get("chunked"):
        lines += [""] + render_chunked(results["chunked"], args)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
