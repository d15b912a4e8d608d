"""
Write-path benchmark: how close does save -> worker -> vector come to raw
SentenceTransformer.encode on the same texts, in the same run?

    .venv/bin/python bench/write_path.py [--rows 1000]

Rows: BBC headlines + first paragraph (real MiniLM, CPU). Prints ratios, not
absolute times: these machines are shared and noisy. Uses the project settings
(a throwaway `test_semantic` database on the embedded PostgreSQL, a local Redis) and
runs the real worker code in-process, one claim after another, as a solo
worker would.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()

    import django

    django.setup()
    from django.test.utils import setup_test_environment  # noqa: F401
    from django.db import connection

    from semantic import cache
    from semantic.encoders import get_encoder
    from semantic.worker import embed_stale_rows
    from project.demo.corpus import iter_articles
    from project.demo.models import Article

    # A throwaway database, like the test runner's.
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        articles = [a for a in iter_articles(args.rows)]
        field = Article._meta.get_field("embedding")
        encoder = get_encoder("default")
        texts = [field.build_text(Article(title=a.title, body=a.body.split("\n")[0])) for a in articles]
        encoder.model.encode(texts[:64], batch_size=32)  # warm up torch

        results = {}
        best = None
        for batch_size in (16, 32, 64):
            start = time.perf_counter()
            encoder.model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
            elapsed = time.perf_counter() - start
            results[f"raw encode, batch {batch_size}"] = elapsed
            best = min(best or elapsed, elapsed)
        start = time.perf_counter()
        for text in texts[: len(texts) // 4]:
            encoder.model.encode([text], normalize_embeddings=True)
        one_by_one = (time.perf_counter() - start) * 4
        results["raw encode, one call per text (extrapolated from 1/4)"] = one_by_one

        worker_seconds = {}

        def load_and_embed(tag, claim_size=None):
            Article.objects.all().delete()
            start = time.perf_counter()
            Article.objects.bulk_create(
                [Article(topic=a.topic, title=a.title, body=a.body.split("\n")[0] + tag, source_file=a.source_file) for a in articles]
            )
            saved = time.perf_counter()
            totals = embed_stale_rows(field, time_budget=3600, claim_size=claim_size)
            assert totals.written == len(articles), totals
            worker_seconds[tag or "plain"] = time.perf_counter() - saved
            return time.perf_counter() - start

        cache.reset_stats()
        results["pipeline: save + worker, cold cache"] = cold = load_and_embed("")
        cold_worker = worker_seconds["plain"]
        results["  of which the worker pass (claim, encode, write)"] = cold_worker
        results["pipeline: save + worker, warm cache (same texts)"] = warm = load_and_embed("")
        warm_worker = worker_seconds["plain"]
        results["  of which the worker pass (claim, cache hits, write)"] = warm_worker
        stats = cache.get_stats()
        # A reindex of rows whose text did not change (update() of another
        # column, semantic_reindex): the worker only confirms their hashes.
        Article.objects.mark_stale()
        start = time.perf_counter()
        totals = embed_stale_rows(field, time_budget=3600)
        assert totals.written == len(articles), totals
        results["re-embed after mark_stale(), texts unchanged"] = unchanged = time.perf_counter() - start
        results["pipeline: one row per claim (like one task per row)"] = per_row = load_and_embed(" [per-row]", claim_size=1) if len(articles) <= 400 else None
        if per_row is None:
            sample = articles[: len(articles) // 4]
            Article.objects.all().delete()
            start = time.perf_counter()
            Article.objects.bulk_create(
                [Article(topic=a.topic, title=a.title, body=a.body.split("\n")[0] + " [per-row]", source_file=a.source_file) for a in sample]
            )
            embed_stale_rows(field, time_budget=3600, claim_size=1)
            per_row = (time.perf_counter() - start) * 4
            results["pipeline: one row per claim (extrapolated from 1/4)"] = per_row
            del results["pipeline: one row per claim (like one task per row)"]

        print(f"\n{len(texts)} texts, model all-MiniLM-L6-v2, device {encoder.device}\n")
        width = max(map(len, results))
        for name, seconds in results.items():
            print(f"{name:<{width}}  {seconds:8.2f} s")
        print()
        print(f"raw best / pipeline cold            = {best / cold:.2f}   (goal >= 0.95)")
        print(f"pipeline per-row / pipeline batched = {per_row / cold:.2f}   (raw one-by-one / raw batched = {one_by_one / best:.2f})")
        print(f"pipeline cold / pipeline warm cache = {cold / warm:.1f}   (goal >= 100; both include saving the rows)")
        print(f"worker pass cold / warm cache       = {cold_worker / warm_worker:.1f}   (both write every vector and chunk)")
        print(f"worker pass cold / unchanged texts  = {cold_worker / unchanged:.1f}")
        print(f"cache counters after cold+warm: {stats}")
    finally:
        connection.creation.destroy_test_db("semantic", verbosity=0)


if __name__ == "__main__":
    main()
