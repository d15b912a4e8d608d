"""
Duplicates and diversity on the demo corpus: how many near-duplicate pairs the
BBC articles hold, how many of them a plain top 10 shows, and what
``collapse=`` / ``diversity=`` cost per search.

    SEMANTIC_DATA_DIR=/tmp/bench-diversity .venv/bin/python bench/diversity.py [--queries 40] [--repeats 5] [--no-write]

Data: the demo's 2,225 BBC articles with real all-MiniLM-L6-v2 vectors, in the
project database of SEMANTIC_DATA_DIR (its own embedded PostgreSQL and Redis,
so other jobs' databases are left alone). When that database holds fewer
articles, ``manage.py demo --no-serve`` loads and embeds them first (about 12
minutes on 2 shared cores). Pairs are compared by the rows' own vectors (the
mean of their chunks), as collapse compares them.

Tables:

* every pair of articles by cosine band, with how many share their body
  text or their title (what tells a copy from a different story);
* for the short news queries of bench/demo_search.py: duplicate pairs
  (cosine >= COLLAPSE_THRESHOLD) within the plain top 10, and with
  ``collapse=True``; for diversity 0.3 / 0.5 / 0.7 (after collapse), the
  mean pairwise cosine of the top 10, its mean score, and how many of the
  plain top 10 it keeps;
* the time per search, variants interleaved query by query (medians, and
  the median of each query's paired difference against the plain search).
"""

import argparse
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.demo_search import QUERIES  # noqa: E402
from bench.report import elapsed_logger, write_section  # noqa: E402

K = 10
CORPUS_SIZE = 2225
BANDS = [0.999, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.90]
DIVERSITIES = [0.3, 0.5, 0.7]
POOLS = [20, 30, 50]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    log = elapsed_logger(time.perf_counter())
    if "SEMANTIC_DATA_DIR" not in os.environ:
        sys.exit("Give the bench a data directory of its own: SEMANTIC_DATA_DIR=/tmp/bench-diversity")

    import django

    django.setup()
    import numpy as np

    from django.conf import settings
    from django.test.utils import override_settings

    from project.demo.models import Article
    from semantic.conf import semantic_settings
    from semantic.retrieval.diversity import cosine_similarities, select

    if Article.objects.count() < CORPUS_SIZE:
        log("loading and embedding the demo corpus (manage.py demo --no-serve)")
        subprocess.run([sys.executable, "manage.py", "demo", "--no-serve"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    threshold = semantic_settings.COLLAPSE_THRESHOLD

    # --- the corpus -----------------------------------------------------------
    pks, titles, bodies, files, vectors = zip(*Article.objects.values_list("pk", "title", "body", "source_file", "embedding"))
    position = {pk: i for i, pk in enumerate(pks)}
    matrix = np.asarray(vectors, dtype=np.float32)
    sims = cosine_similarities(matrix)
    upper = np.triu_indices(len(pks), 1)
    pair_sims = sims[upper]
    log(f"{len(pks)} articles, {len(pair_sims):,} pairs")
    bands = []
    for high, low in zip([9.0, *BANDS[:-1]], BANDS):
        chosen = np.flatnonzero((pair_sims >= low) & (pair_sims < high))
        pairs = [(upper[0][i], upper[1][i]) for i in chosen]
        same_body = sum(bodies[a].strip() == bodies[b].strip() for a, b in pairs)
        same_title = sum(titles[a].strip() == titles[b].strip() for a, b in pairs)
        examples = [
            f"{pair_sims[i]:.3f} {files[a]} “{titles[a]}” / {files[b]} “{titles[b]}”"
            for i, (a, b) in zip(chosen, pairs)
            if titles[a].strip() != titles[b].strip()
        ][:2]
        bands.append((low, high, len(pairs), same_body, same_title, examples))
    identical_bodies = sum(
        len(group) * (len(group) - 1) // 2
        for group in _groups(range(len(pks)), key=lambda i: bodies[i].strip())
    )
    at_threshold = int((pair_sims >= threshold - 1e-6).sum())
    close = np.triu(sims >= threshold - 1e-6, 1)
    rows_in_pairs = int((close.any(axis=0) | close.any(axis=1)).sum())

    # --- what a search shows ----------------------------------------------------
    field = Article._meta.get_field("embedding")
    texts = QUERIES[: args.queries]
    query_vectors = [v.astype("float32") for v in field.encoder.model.encode(texts, normalize_embeddings=True)]

    def top(vector, **kwargs):
        return [(row.pk, row.score) for row in Article.objects.nearest(vector, k=K, **kwargs)]

    def duplicate_pairs(found):
        idx = [position[pk] for pk, _ in found]
        return sum(sims[a, b] >= threshold - 1e-6 for a, b in itertools.combinations(idx, 2))

    def mean_pairwise(found):
        idx = [position[pk] for pk, _ in found]
        return statistics.mean(float(sims[a, b]) for a, b in itertools.combinations(idx, 2))

    quality = {"plain": [], "collapse": [], **{f"collapse + diversity {d}": [] for d in DIVERSITIES}}
    for vector in query_vectors:
        plain = top(vector)
        ranks = {row.pk: rank for rank, row in enumerate(Article.objects.nearest(vector, k=max(POOLS)), 1)}
        variants = {"plain": plain, "collapse": top(vector, collapse=True)}
        for d in DIVERSITIES:
            variants[f"collapse + diversity {d}"] = top(vector, collapse=True, diversity=d)
        for name, found in variants.items():
            quality[name].append(
                (
                    duplicate_pairs(found),
                    mean_pairwise(found),
                    statistics.mean(score for _, score in found),
                    len({pk for pk, _ in found} & {pk for pk, _ in plain}),
                    len(found),
                    max(ranks[pk] for pk, _ in found),
                )
            )
    log("quality measured")

    # A smaller pool is a cheaper search: how often does it change the top 10?
    pool_changes = {}
    for pool in POOLS:
        with override_settings(SEMANTIC={**settings.SEMANTIC, "DIVERSITY_CANDIDATES": pool}):
            pool_changes[pool] = [
                [pk for pk, _ in top(vector, collapse=True, diversity=0.5)] for vector in query_vectors
            ]
    reference = pool_changes[max(POOLS)]
    pool_changes = {
        pool: (sum(a != b for a, b in zip(found, reference)), sum(set(a) != set(b) for a, b in zip(found, reference)))
        for pool, found in pool_changes.items()
        if pool != max(POOLS)
    }

    # --- time -------------------------------------------------------------------
    timed = {
        "`nearest(v, k=10)`": {},
        "`nearest(v, k=50)` (the candidates alone)": {"k": 50},
        "`nearest(v, k=10, collapse=True)`": {"collapse": True},
        "`nearest(v, k=10, collapse=True, diversity=0.5)`": {"collapse": True, "diversity": 0.5},
        "the same, from 30 candidates (`DIVERSITY_CANDIDATES=30`)": {"collapse": True, "diversity": 0.5, "_pool": 30},
    }

    def search(vector, options):
        options = dict(options)
        pool = options.pop("_pool", None)
        if pool is None:
            return list(Article.objects.nearest(vector, **{"k": K, **options}))
        with override_settings(SEMANTIC={**settings.SEMANTIC, "DIVERSITY_CANDIDATES": pool}):
            return list(Article.objects.nearest(vector, **{"k": K, **options}))

    for options in timed.values():  # warm up: models, compiled SQL, connection settings
        search(query_vectors[0], options)
    times = {name: [[] for _ in query_vectors] for name in timed}
    for repeat in range(args.repeats):
        for i, vector in enumerate(query_vectors):
            order = list(timed.items())
            if (i + repeat) % 2:
                order.reverse()
            for name, options in order:
                start = time.perf_counter()
                search(vector, options)
                times[name][i].append(time.perf_counter() - start)
    # The choice alone, in Python: 50 candidate vectors of 384 dimensions.
    sample = matrix[:50]
    relevance = np.linspace(1, 0, 50)
    select_times = []
    for _ in range(200):
        start = time.perf_counter()
        select(sample, relevance, K, collapse_threshold=threshold, diversity=0.5)
        select_times.append(time.perf_counter() - start)
    log("timed")

    text = render(args, len(pks), len(pair_sims), threshold, bands, identical_bodies, at_threshold, rows_in_pairs, quality,
                  pool_changes, times, statistics.median(select_times), len(texts))
    print(text)
    if not args.no_write:
        write_section("diversity", text)
        print(f"\nwritten to {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


def _groups(items, key):
    groups = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups.values()


def render(args, articles, pairs, threshold, bands, identical_bodies, at_threshold, rows_in_pairs, quality, pool_changes,
           times, select_s, queries):
    lines = [
        "## Duplicates and diversity",
        "",
        f"`SEMANTIC_DATA_DIR=/tmp/bench-diversity bench/diversity.py --queries {queries} --repeats {args.repeats}`, "
        f"{datetime.date.today()}. The demo's {articles:,} BBC articles (all-MiniLM-L6-v2; row vectors, the mean of "
        f"each article's chunks), {platform.machine()}, {os.cpu_count()} cores shared with other jobs.",
        "",
        f"**Pairs of articles by cosine similarity** ({pairs:,} pairs; {identical_bodies} pairs have identical body text). "
        "A different title in a high band is a rewrite or a follow-up of one story; examples are the first two such pairs.",
        "",
        "| cosine | pairs | same body | same title | e.g. (different titles) |",
        "|---|---:|---:|---:|---|",
    ]
    for low, high, count, same_body, same_title, examples in bands:
        label = f">= {low}" if high > 1.5 else f"[{low}, {high})"
        lines.append(f"| {label} | {count} | {same_body} | {same_title} | {'<br>'.join(examples)} |")
    lines += [
        "",
        f"At COLLAPSE_THRESHOLD = {threshold}: {at_threshold} pairs, {rows_in_pairs} articles in at least one.",
        "",
        f"**What the top {K} shows** ({queries} short news queries, `nearest(v, k={K})` by best chunk, "
        "pool of DIVERSITY_CANDIDATES = 50): duplicate pairs are pairs in the top 10 at cosine >= "
        f"{threshold}; similarity is the mean cosine over the 45 pairs of the top 10; score is the search's "
        "own (best chunk's) mean score; deepest: the lowest plain rank a shown row had (median / max over queries).",
        "",
        "| variant | queries with a duplicate pair | duplicate pairs (total) | mean pairwise cosine | mean score "
        "| plain top 10 kept | rows | deepest plain rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in quality.items():
        dups, pairwise, score, kept, rows, deepest = zip(*values)
        lines.append(
            f"| {name} | {sum(1 for d in dups if d)} / {len(dups)} | {sum(dups)} | {statistics.mean(pairwise):.3f} | "
            f"{statistics.mean(score):.3f} | {statistics.mean(kept):.1f} | {statistics.mean(rows):.1f} | "
            f"{statistics.median(deepest):.0f} / {max(deepest)} |"
        )
    lines += [
        "",
        f"Top 10 of `collapse=True, diversity=0.5` that differ from the {max(POOLS)}-candidate one (in order / as a set), "
        "by pool size: "
        + ", ".join(f"{pool} candidates: {order} / {rows} of {queries} queries" for pool, (order, rows) in pool_changes.items())
        + " (relevance is rescaled over the pool, so the pool is part of the result, as LangChain's fetch_k is).",
    ]
    base = [statistics.median(per_query) for per_query in times["`nearest(v, k=10)`"]]
    lines += [
        "",
        f"**Time per search** (each query {args.repeats} times, variants interleaved, order alternating; "
        "medians over queries of each query's median; extra: median of the paired per-query differences "
        f"against `nearest(v, k=10)`). The choice itself (`diversity.select`, 50 x 384, collapse + MMR) takes "
        f"{select_s * 1000:.2f} ms in Python.",
        "",
        "| search | p50 ms | extra ms (paired) | / plain |",
        "|---|---:|---:|---:|",
    ]
    for name, per_query in times.items():
        medians = [statistics.median(values) for values in per_query]
        extra = statistics.median(m - b for m, b in zip(medians, base))
        lines.append(
            f"| {name} | {statistics.median(medians) * 1000:.2f} | {extra * 1000:+.2f} | "
            f"{statistics.median(medians) / statistics.median(base):.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
