"""
The default search call on the demo, against the raw SQL a peer would write.

    .venv/bin/python bench/demo_search.py [--queries 40] [--repeats 3] [--no-write]

Data: the demo's BBC articles as ``python manage.py demo`` loads them
(2,225 rows, ~5,700 chunks, real all-MiniLM-L6-v2 vectors), in the project's
database; run the demo once first. Queries: short news-style texts, encoded
once (vector queries) or new each time (text queries).

Rows of the table, interleaved query by query (these 2 cores are shared and
noisy; compare within this run):

* raw SQL: what a peer runs on the same chunk table through the HNSW index,
  one round trip with the connection's settings (ef_search 100): the 50
  nearest chunks, best per owner, the rows joined, best chunk text included;
* ``Article.objects.nearest(v, k=10)``: instances with ``best_chunk``, the
  automatic exact/index choice;
* the same with ``exact=False`` and ``exact=True``;
* a new text: raw ``SentenceTransformer.encode`` + that SQL, against
  ``Article.objects.semantic_search(text, k=10)``.

Recall@10 of each against an exact best-chunk oracle computed in numpy from
the stored chunk vectors, and the rows returned under filters keeping
50/10/1/0.1% of the articles (by primary key range).
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

from bench.report import write_section  # noqa: E402

K = 10
QUERIES = [
    "mobile phone sales", "interest rates rise", "election campaign", "football transfer", "film awards",
    "oil prices", "broadband internet", "tax cuts", "tennis final", "music album chart",
    "airline job cuts", "computer virus", "olympic athletes", "stock market fall", "video games console",
    "court ruling", "rugby injury", "box office hit", "bank profits", "immigration policy",
    "rail strike", "software piracy", "world cup qualifier", "budget deficit", "pop star tour",
    "security flaw", "car maker", "drugs test ban", "cinema release", "minister resigns",
    "search engine", "euro currency", "cricket series", "digital music downloads", "housing market",
    "terror laws", "chelsea manager", "oscar nominations", "mobile tv", "trade deficit",
]

PEER_SQL = (
    "SELECT a.*, b.distance, b.id, b.text FROM ("
    " SELECT DISTINCT ON (owner_id) owner_id, id, distance, text FROM ("
    "  SELECT owner_id, id, text, embedding <=> %s AS distance FROM {chunks} ORDER BY distance LIMIT 50"
    " ) s ORDER BY owner_id, distance"
    ") b JOIN {rows} a ON a.id = b.owner_id ORDER BY b.distance LIMIT 10"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import django

    django.setup()
    import numpy as np
    from django.db import connection

    from project.demo.models import Article
    from semantic.distances import vector_literal
    from semantic.retrieval.query_vectors import forget_query_vectors

    field = Article._meta.get_field("embedding")
    chunk_model = field.chunk_model
    rows_total, chunks_total = Article.objects.count(), chunk_model.objects.count()
    if rows_total < 100:
        sys.exit("Load the demo first: python manage.py demo --no-serve")
    encoder = field.encoder
    model = encoder.model
    texts = QUERIES[: args.queries]
    vectors = [v.astype("float32") for v in model.encode(texts, normalize_embeddings=True)]
    sql = PEER_SQL.format(chunks=chunk_model._meta.db_table, rows=Article._meta.db_table)

    owners, chunk_vectors = zip(*chunk_model.objects.values_list("owner_id", "embedding"))
    owners = np.asarray(owners)
    chunk_matrix = np.asarray(chunk_vectors, dtype=np.float64)

    def oracle(vector, keep=None):
        distances = 1.0 - chunk_matrix @ vector.astype(np.float64)
        best = {}
        for owner, distance in zip(owners, distances):
            if (keep is None or keep(owner)) and distance < best.get(owner, 9.0):
                best[owner] = distance
        return [owner for owner, _ in sorted(best.items(), key=lambda item: item[1])[:K]]

    def raw(vector):
        with connection.cursor() as cursor:
            cursor.execute(sql, [vector_literal(vector)])
            return [row[0] for row in cursor.fetchall()]

    def orm(**options):
        def run(vector):
            found = list(Article.objects.nearest(vector, k=K, **options))
            assert all(row.best_chunk is not None for row in found)
            return [row.pk for row in found]

        return run

    variants = {
        "raw SQL, HNSW over chunks (one round trip)": raw,
        "`nearest(v, k=10)` (default: auto)": orm(),
        "`nearest(v, k=10, exact=False)`": orm(exact=False),
        "`nearest(v, k=10, exact=True)`": orm(exact=True),
    }
    chosen = Article.objects.nearest(vectors[0], k=K).search_settings()
    for fn in variants.values():  # warm up
        fn(vectors[0])
    times = {name: [] for name in variants}
    recalls = {name: [] for name in variants}
    truth = [oracle(v) for v in vectors]
    for repeat in range(args.repeats):
        for i, vector in enumerate(vectors):
            order = list(variants.items())
            if (i + repeat) % 2:
                order.reverse()
            for name, fn in order:
                start = time.perf_counter()
                found = fn(vector)
                times[name].append(time.perf_counter() - start)
                if repeat == 0:
                    recalls[name].append(len(set(found) & set(truth[i])) / K)

    # Filters by primary key range: the share of articles each keeps.
    pks = sorted(Article.objects.values_list("pk", flat=True))
    filtered = []
    for share in (0.5, 0.1, 0.01, 0.001):
        last = pks[max(0, int(len(pks) * share) - 1)]
        kept = sum(1 for pk in pks if pk <= last)
        counts, hits = [], []
        for vector in vectors[:10]:
            found = [row.pk for row in Article.objects.filter(pk__lte=last).nearest(vector, k=K)]
            counts.append(len(set(found)))
            expected = oracle(vector, keep=lambda owner: owner <= last)
            hits.append(len(set(found) & set(expected)) / max(1, len(expected)))
        settings_used = Article.objects.filter(pk__lte=last).nearest(vectors[0], k=K).search_settings()
        filtered.append((share, kept, statistics.mean(counts), min(K, kept), statistics.mean(hits), settings_used))

    # New query texts: nothing cached anywhere.
    stamp = time.time_ns()
    text_times = {"raw `encode()` + raw SQL": [], "`semantic_search(text, k=10)`": []}
    for repeat in range(args.repeats):
        for i, text in enumerate(texts):
            fresh = f"{text} {stamp} {repeat} {i}"
            forget_query_vectors()
            pair = [
                ("raw `encode()` + raw SQL", lambda: raw(model.encode(fresh + " raw", normalize_embeddings=True))),
                ("`semantic_search(text, k=10)`", lambda: list(Article.objects.semantic_search(fresh + " orm", k=K))),
            ]
            if (i + repeat) % 2:
                pair.reverse()
            for name, fn in pair:
                start = time.perf_counter()
                fn()
                text_times[name].append(time.perf_counter() - start)

    base = statistics.median(times["raw SQL, HNSW over chunks (one round trip)"])
    lines = [
        "## Default search call on the demo",
        "",
        f"`bench/demo_search.py --queries {len(texts)} --repeats {args.repeats}`, {datetime.date.today()}. "
        f"The demo's {rows_total:,} BBC articles ({chunks_total:,} chunks, all-MiniLM-L6-v2, HNSW m=16 on the chunk table), "
        f"{len(texts)} short news queries, k={K}, {platform.machine()}, {os.cpu_count()} cores shared with other jobs: "
        "compare rows within this run. Variants interleaved query by query; medians. The connection starts with the "
        "index settings (`semantic.retrieval.session.connection_options()`, set in the project's DATABASES), so the raw SQL "
        "and the ORM both run in one round trip.",
        "",
        f"The automatic choice for the unfiltered call: `{chosen}` (an exact scan would compare ~{chunks_total:,} chunk vectors, "
        "above EXACT_SEARCH_THRESHOLD).",
        "",
        "| vector query | p50 ms | p95 ms | / raw SQL | recall@10 vs exact best-chunk oracle |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in variants:
        p50 = statistics.median(times[name])
        p95 = sorted(times[name])[int(0.95 * (len(times[name]) - 1))]
        lines.append(f"| {name} | {p50 * 1000:.2f} | {p95 * 1000:.2f} | {p50 / base:.2f}x | {statistics.mean(recalls[name]):.3f} |")
    text_base = statistics.median(text_times["raw `encode()` + raw SQL"])
    lines += ["", "| new query text | p50 ms | p95 ms | / raw |", "|---|---:|---:|---:|"]
    for name, values in text_times.items():
        p50 = statistics.median(values)
        p95 = sorted(values)[int(0.95 * (len(values) - 1))]
        lines.append(f"| {name} | {p50 * 1000:.2f} | {p95 * 1000:.2f} | {p50 / text_base:.2f}x |")
    lines += [
        "",
        "Filtered: `Article.objects.filter(pk__lte=...).nearest(v, k=10)` (default options), 10 queries each.",
        "",
        "| filter keeps | rows | distinct rows returned (mean) | expected | recall@10 | settings chosen |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for share, kept, mean_rows, expected, recall, settings_used in filtered:
        lines.append(f"| {share:.1%} | {kept:,} | {mean_rows:.1f} | {expected} | {recall:.3f} | `{settings_used}` |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("demo_search", text)


if __name__ == "__main__":
    main()
