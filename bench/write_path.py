"""
Write-path benchmark: how close does save -> worker -> vector come to raw
SentenceTransformer.encode of the same texts, in the same run?

    .venv/bin/python bench/write_path.py [--rows 600] [--device cpu|cuda] [--batch-sizes 16,32,64] [--no-write]

Rows: BBC headlines + first paragraph, real all-MiniLM-L6-v2. The baseline is
what a user would otherwise run: ``encode()`` of exactly the texts the worker
encodes (its chunks, split by the worker's own code), at each batch size;
the worker then runs at the best of them, so both sides use the same batch
size. Prints ratios, not absolute times (these machines are shared and
noisy), and writes its table into BENCHMARKS.md between its markers. Uses
the project settings: a throwaway test database on the embedded PostgreSQL
and a local Redis; the worker code runs in-process, one claim after
another, as a solo worker would.
"""

import argparse
import datetime
import os
import platform
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.report import write_section  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--device", default=None, help="torch device (default: the settings' DEVICE)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 16,32,64 on CPU, 32,64,128,256 on CUDA)")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None, help="half precision on CUDA (default: CUDA_FP16)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from django.db import connection
    from django.test import override_settings

    from project.demo.corpus import iter_articles
    from project.demo.models import Article
    from semantic import cache
    from semantic.chunking import Chunker
    from semantic.encoders import resolve_device
    from semantic.worker import embed_stale_rows

    device = args.device or resolve_device(settings.SEMANTIC.get("DEVICE", "auto"))
    default_sizes = "32,64,128,256" if device.startswith("cuda") else "16,32,64"
    batch_sizes = [int(size) for size in (args.batch_sizes or default_sizes).split(",")]
    semantic = {**settings.SEMANTIC, "DEVICE": device}
    if args.fp16 is not None:
        semantic["CUDA_FP16"] = args.fp16
    began = time.perf_counter()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    try:
        with override_settings(SEMANTIC=semantic):
            field = Article._meta.get_field("embedding")
            encoder = field.encoder
            # A tag unique to this run: the embedding cache outlives runs, and
            # a text it holds would not be encoded cold.
            tag = f" [{uuid.uuid4().hex[:8]}]"
            articles = list(iter_articles(args.rows))
            rows = [Article(topic=a.topic, title=a.title, body=a.body.split("\n")[0] + tag, source_file=a.source_file) for a in articles]
            chunker = Chunker(encoder, field.overlap)
            texts = [chunk.text for row in rows for chunk in chunker.split(field.build_text(row))]
            model = encoder.model
            model.encode(texts[:64], batch_size=32)  # warm up torch

            raw = {}
            for size in batch_sizes:
                start = time.perf_counter()
                model.encode(texts, batch_size=size, normalize_embeddings=True)
                raw[size] = time.perf_counter() - start
            best_size = min(raw, key=raw.get)
            sample = texts[: max(1, len(texts) // 4)]
            start = time.perf_counter()
            for text in sample:
                model.encode([text], normalize_embeddings=True)
            one_by_one = (time.perf_counter() - start) * len(texts) / len(sample)

            def save_and_embed(subset, claim_size=None, suffix=""):
                """Seconds to save the rows (their bodies + ``suffix``), and for the worker to embed them."""
                Article.objects.all().delete()
                start = time.perf_counter()
                Article.objects.bulk_create(
                    [Article(topic=r.topic, title=r.title, body=r.body + suffix, source_file=r.source_file) for r in subset]
                )
                saved = time.perf_counter()
                totals = embed_stale_rows(field, time_budget=3600, claim_size=claim_size)
                assert totals.written == len(subset) and not totals.failed, totals
                return saved - start, time.perf_counter() - saved

            with override_settings(SEMANTIC={**semantic, "BATCH_SIZE": best_size}):
                cache.reset_stats()
                cold_save, cold = save_and_embed(rows)
                stats = cache.get_stats()
                warm_save, warm = save_and_embed(rows)  # new rows, the same texts: every chunk a cache hit
                Article.objects.mark_stale(wake=False)
                start = time.perf_counter()
                assert embed_stale_rows(field, time_budget=3600).confirmed == len(rows)
                unchanged = time.perf_counter() - start
                # Other texts (a suffix), so that they are encoded cold too.
                per_row_sample = rows[: max(1, len(rows) // 4)]
                _, per_row = save_and_embed(per_row_sample, claim_size=1, suffix=" [per row]")
                per_row *= len(rows) / len(per_row_sample)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    text = render(
        args=args,
        device=device,
        fp16=semantic.get("CUDA_FP16", True) and device.startswith("cuda"),
        rows=len(rows),
        texts=len(texts),
        raw=raw,
        best_size=best_size,
        one_by_one=one_by_one,
        cold=cold,
        cold_save=cold_save,
        warm=warm,
        warm_save=warm_save,
        unchanged=unchanged,
        per_row=per_row,
        stats=stats,
        seconds=time.perf_counter() - began,
    )
    print(text)
    if not args.no_write:
        write_section("write_path", text)
        print("\nwritten to BENCHMARKS.md", file=sys.stderr)


def render(*, args, device, fp16, rows, texts, raw, best_size, one_by_one, cold, cold_save, warm, warm_save, unchanged, per_row, stats, seconds):
    best = raw[best_size]
    command = "bench/write_path.py" + "".join(
        f" --{name.replace('_', '-')} {value}" for name, value in (("rows", args.rows), ("device", args.device), ("batch_sizes", args.batch_sizes)) if value
    )
    lines = [
        "## Write path",
        "",
        f"`{command}`, {datetime.date.today()}. {rows} BBC articles (headline + first paragraph), {texts} texts after "
        f"chunking, all-MiniLM-L6-v2 on {device}{' in fp16' if fp16 else ''}, {platform.machine()}, "
        f"{os.cpu_count()} cores, shared and noisy: compare rows within this run. Whole run {seconds / 60:.1f} min.",
        "",
        "The raw baseline encodes exactly the texts the worker encodes (its chunks, split by its own code); "
        f"the worker runs at the best raw batch size ({best_size}). *Worker pass*: claim, cache lookup, encode, "
        "write vectors and chunks, from committed rows to committed vectors; saving the rows is timed apart.",
        "",
        "| run | seconds | texts/s |",
        "|---|---:|---:|",
    ]
    for size, elapsed in raw.items():
        lines.append(f"| raw `encode()`, batch {size}{' (best)' if size == best_size else ''} | {elapsed:.2f} | {texts / elapsed:.0f} |")
    lines += [
        f"| raw `encode()`, one call per text (extrapolated from a quarter) | {one_by_one:.2f} | {texts / one_by_one:.0f} |",
        f"| worker pass, cold cache (saving the rows: {cold_save:.2f} s) | {cold:.2f} | {texts / cold:.0f} |",
        f"| worker pass, warm cache: new rows, same texts (saving: {warm_save:.2f} s) | {warm:.2f} | |",
        f"| worker pass after `mark_stale()`, texts unchanged (hashes confirmed) | {unchanged:.3f} | |",
        f"| worker, one row per claim (like one task per row; extrapolated from a quarter) | {per_row:.2f} | |",
        "",
        "| ratio | value | goal |",
        "|---|---:|---|",
        f"| raw best / worker pass, cold | {best / cold:.2f} | >= 0.95 |",
        f"| worker per-row claims / batched | {per_row / cold:.1f} | (raw one-by-one / batched: {one_by_one / best:.1f}) |",
        f"| worker pass cold / warm cache (new rows) | {cold / warm:.1f} | |",
        f"| worker pass cold / texts unchanged | {cold / unchanged:.0f} | >= 100 |",
        "",
        f"Cache counters of the cold pass: {stats}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
