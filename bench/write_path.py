"""
Write-path benchmark: how close does save -> worker -> vector come to raw
SentenceTransformer.encode of the same texts, in the same run?

    .venv/bin/python bench/write_path.py [--rows 600] [--repeats 5] [--full] [--device cpu|cuda]
                                         [--batch-sizes 16,32,64] [--no-write]

Rows: BBC headlines + first paragraph (``--full``: the whole article, as the
demo loads it, so several chunks per row), real all-MiniLM-L6-v2. The
baseline is what a user would otherwise run: ``encode()`` of exactly the
texts the worker encodes (its chunks, split by the worker's own code) at the
best of the batch sizes; the worker runs at that batch size. These machines
are shared and noisy, so every measurement is repeated, raw and worker
interleaved (their order alternating), each repeat with texts of its own so
that the worker's cold pass is cold; the table gives medians, and each ratio
is the median of the repeats' own ratios. Writes its table into BENCHMARKS.md
between its markers. Uses the project settings: a throwaway database of its
own on the embedded PostgreSQL and a local Redis; the worker code runs
in-process, one claim after another, as a solo worker would.

The FillFactor rows measure HOT updates, which need the versions a pass
leaves dead to be pruned, which no transaction older than them may
prevent, in any database of the cluster: while other jobs run long
transactions there (an index build), give the bench a cluster of its own,
``SEMANTIC_DATA_DIR=/tmp/write-bench .venv/bin/python bench/write_path.py``.
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
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Its own database: another bench may be using the default test database.
DATABASE = "test_semantic_write_path"
# The FillFactor of the extra rows that show what HOT updates change.
FILLFACTOR = 50
# One-text-per-call and one-row-per-claim runs take one in SAMPLE texts or rows.
SAMPLE = 20

from bench.report import write_section  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="whole articles (several chunks each) instead of headline + first paragraph")
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
    from semantic import FillFactor, cache
    from semantic.chunking import Chunker
    from semantic.encoders import resolve_device
    from semantic.status import stale_mark
    from semantic.worker import embed_stale_rows

    device = args.device or resolve_device(settings.SEMANTIC.get("DEVICE", "auto"))
    default_sizes = "32,64,128,256" if device.startswith("cuda") else "16,32,64"
    batch_sizes = [int(size) for size in (args.batch_sizes or default_sizes).split(",")]
    semantic = {**settings.SEMANTIC, "DEVICE": device}
    if args.fp16 is not None:
        semantic["CUDA_FP16"] = args.fp16
    began = time.perf_counter()
    old_name = connection.settings_dict["NAME"]
    connection.settings_dict["TEST"] = {**connection.settings_dict.get("TEST", {}), "NAME": DATABASE}
    connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    times = {}

    def timed(name, function, *arguments, **keywords):
        start = time.perf_counter()
        value = function(*arguments, **keywords)
        times.setdefault(name, []).append(time.perf_counter() - start)
        return value

    try:
        with override_settings(SEMANTIC=semantic):
            field = Article._meta.get_field("embedding")
            articles = list(iter_articles(args.rows))
            chunker = Chunker(field.encoder, field.overlap)
            tables = f"{Article._meta.db_table}, {field.chunk_model._meta.db_table}"

            def new_rows():
                """The articles as unsaved rows, every paragraph tagged anew: texts of this repeat only."""
                tag = f" [{uuid.uuid4().hex[:8]}]"
                return [
                    Article(
                        topic=a.topic,
                        title=a.title,
                        body="\n".join(paragraph + tag for paragraph in (a.body.split("\n") if args.full else a.body.split("\n")[:1])),
                        source_file=a.source_file,
                    )
                    for a in articles
                ]

            def chunk_texts(rows):
                return [chunk.text for row in rows for chunk in chunker.split(field.build_text(row))]

            def raw(texts, size):
                # The worker's own model: a settings change (BATCH_SIZE below)
                # makes a new encoder, whose model loads on first use.
                field.encoder.model.encode(texts, batch_size=size, normalize_embeddings=True)

            def save(rows):
                """A table holding exactly ``rows`` (saving is not timed): old rows deleted, dead ones vacuumed."""
                Article.objects.all().delete()
                with connection.cursor() as cursor:
                    cursor.execute(f"VACUUM {tables}")
                Article.objects.bulk_create([Article(topic=r.topic, title=r.title, body=r.body, source_file=r.source_file) for r in rows])

            def embed(expect=None):
                totals = embed_stale_rows(field, time_budget=3600)
                assert totals.written == len(articles) and not totals.failed, totals
                if expect:
                    assert getattr(totals, expect) == len(articles), totals
                return totals

            room = FillFactor(FILLFACTOR, name="bench_article_fillfactor")
            rows = new_rows()
            texts = chunk_texts(rows)
            raw(texts[:64], 32)  # warm up torch
            # The best batch size: each size twice, interleaved, best of the two.
            sweep = {size: [] for size in batch_sizes}
            for _ in range(2):
                for size in batch_sizes:
                    start = time.perf_counter()
                    raw(texts, size)
                    sweep[size].append(time.perf_counter() - start)
            best_size = min(batch_sizes, key=lambda size: min(sweep[size]))

            with override_settings(SEMANTIC={**semantic, "BATCH_SIZE": best_size}):
                # Loaded here, not in the first timed pass: a worker loads its model once per process.
                raw(texts[:64], best_size)
                for repeat in range(args.repeats):
                    rows = new_rows()
                    texts = chunk_texts(rows)
                    # The embedding cache outlives runs and is shared: make sure no chunk of these is in it.
                    cache.delete_vectors([field.encoder.text_hash(text) for text in texts])
                    save(rows)
                    # Alternate which goes first, so a drift in the machine's load favours neither.
                    if repeat % 2:
                        timed("raw", raw, texts, best_size)
                        timed("cold", embed, "embedded")
                    else:
                        timed("cold", embed, "embedded")
                        timed("raw", raw, texts, best_size)
                    save(rows)  # new rows, the same texts: every chunk a cache hit
                    timed("warm", embed, "embedded")
                    # What the HNSW indexes cost the pass: the same warm pass with
                    # both tables' vector indexes dropped (and built again after).
                    with connection.cursor() as cursor:
                        cursor.execute(
                            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN (%s, %s) AND indexdef ILIKE '%% USING hnsw %%'",
                            [Article._meta.db_table, field.chunk_model._meta.db_table],
                        )
                        vector_indexes = cursor.fetchall()
                        for name, _ in vector_indexes:
                            cursor.execute(f'DROP INDEX "{name}"')
                    save(rows)
                    timed("warm_no_index", embed, "embedded")
                    with connection.cursor() as cursor:
                        for _, definition in vector_indexes:
                            cursor.execute(definition)
                    Article.objects.mark_stale(wake=False)
                    timed("unchanged", embed, "confirmed")
                    # semantic_reindex --force: encoded again (cache hits), chunks unchanged.
                    Article.objects.update(**stale_mark(field, forget_vectors=True))
                    timed("forced", embed, "embedded")
                    # What HOT updates change: the same two passes, the rows saved
                    # into pages with room (semantic.FillFactor, as a site declares it).
                    with connection.schema_editor() as editor:
                        editor.add_constraint(Article, room)
                    save(rows)
                    embed("embedded")
                    Article.objects.mark_stale(wake=False)
                    timed("unchanged_fillfactor", embed, "confirmed")
                    Article.objects.update(**stale_mark(field, forget_vectors=True))
                    timed("forced_fillfactor", embed, "embedded")
                    with connection.schema_editor() as editor:
                        editor.remove_constraint(Article, room)
                # Once: one text per encode() call, and one row per claim (both extrapolated from a sample).
                sample = texts[: max(1, len(texts) // SAMPLE)]
                start = time.perf_counter()
                for text in sample:
                    field.encoder.model.encode([text], normalize_embeddings=True)
                one_by_one = (time.perf_counter() - start) * len(texts) / len(sample)
                sampled = new_rows()[: max(1, len(articles) // SAMPLE)]
                cache.delete_vectors([field.encoder.text_hash(text) for text in chunk_texts(sampled)])
                save(sampled)
                start = time.perf_counter()
                embed_stale_rows(field, time_budget=3600, claim_size=1)
                per_row = (time.perf_counter() - start) * len(articles) / len(sampled)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    text = render(
        args=args,
        device=device,
        fp16=semantic.get("CUDA_FP16", True) and device.startswith("cuda"),
        rows=len(articles),
        texts=len(texts),
        sweep=sweep,
        best_size=best_size,
        times=times,
        one_by_one=one_by_one,
        per_row=per_row,
        seconds=time.perf_counter() - began,
    )
    print(text)
    if not args.no_write:
        write_section("write_path_full" if args.full else "write_path", text)
        print("\nwritten to BENCHMARKS.md", file=sys.stderr)


def render(*, args, device, fp16, rows, texts, sweep, best_size, times, one_by_one, per_row, seconds):
    median = {name: statistics.median(values) for name, values in times.items()}

    def ratio(numerator, denominator):
        """The median over repeats of numerator/denominator, each repeat's own pair."""
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

    def spread(name):
        values = times[name]
        return f"{min(values):.3f}–{max(values):.3f}" if len(values) > 1 else ""

    command = "bench/write_path.py" + "".join(
        f" --{name.replace('_', '-')} {value}"
        for name, value in (("rows", args.rows), ("repeats", args.repeats), ("device", args.device), ("batch_sizes", args.batch_sizes))
        if value
    ) + (" --full" if args.full else "")
    goals = [
        ("raw best `encode()` / worker pass, cold", ratio("raw", "cold"), 0.95, "{:.2f}"),
        ("worker pass cold / texts unchanged (after `mark_stale()`)", ratio("cold", "unchanged"), 100, "{:.0f}"),
        (f"the same, table with `FillFactor({FILLFACTOR})`", ratio("cold", "unchanged_fillfactor"), 100, "{:.0f}"),
        ("worker pass cold / `--force` re-embed (cache hits)", ratio("cold", "forced"), 100, "{:.0f}"),
        (f"the same, table with `FillFactor({FILLFACTOR})`", ratio("cold", "forced_fillfactor"), 100, "{:.0f}"),
    ]
    lines = [
        "## Write path, whole articles" if args.full else "## Write path",
        "",
        f"`{command}`, {datetime.date.today()}. {rows} BBC articles "
        f"({'whole articles' if args.full else 'headline + first paragraph'}), {texts} texts after chunking, "
        f"all-MiniLM-L6-v2 on {device}{' in fp16' if fp16 else ''}, {platform.machine()}, {os.cpu_count()} cores, "
        f"shared and noisy. Whole run {seconds / 60:.1f} min.",
        "",
        "Raw `encode()` gets exactly the texts the worker encodes (its chunks, split by its own code), at the best "
        f"batch size of the sweep ({best_size}: {', '.join(f'{size}: {min(v):.2f} s' for size, v in sweep.items())}, best of 2); "
        "the worker runs at that batch size. *Worker pass*: claim, read, split, cache lookup, encode, write "
        "vectors and chunks, commit, from committed rows to committed vectors; saving the rows is not timed, nor is "
        "loading the model (once per worker process). "
        f"{args.repeats} repeats, raw and worker interleaved with their order alternating, each repeat with texts "
        "of its own (every paragraph tagged anew, and their chunks deleted from the embedding cache: cold means cold); seconds are medians (min–max), ratios the median of each repeat's own ratio.",
        "",
        "| run | seconds | texts/s |",
        "|---|---:|---:|",
        f"| raw `encode()`, batch {best_size} | {median['raw']:.2f} ({spread('raw')}) | {texts / median['raw']:.0f} |",
        f"| worker pass, cold cache | {median['cold']:.2f} ({spread('cold')}) | {texts / median['cold']:.0f} |",
        f"| worker pass, warm cache: new rows, same texts | {median['warm']:.3f} ({spread('warm')}) | |",
        f"| the same without the two HNSW indexes (row vectors, chunks) | {median['warm_no_index']:.3f} ({spread('warm_no_index')}) | |",
        f"| worker pass after `mark_stale()`, texts unchanged (hashes confirmed) | {median['unchanged']:.3f} ({spread('unchanged')}) | |",
        f"| the same, table with `semantic.FillFactor({FILLFACTOR})` (HOT updates) "
        f"| {median['unchanged_fillfactor']:.3f} ({spread('unchanged_fillfactor')}) | |",
        f"| worker pass after `semantic_reindex --force`, texts unchanged (cache hits, no chunk rewritten) | {median['forced']:.3f} ({spread('forced')}) | |",
        f"| the same, table with `semantic.FillFactor({FILLFACTOR})` "
        f"| {median['forced_fillfactor']:.3f} ({spread('forced_fillfactor')}) | |",
        f"| raw `encode()`, one call per text (once, extrapolated from a twentieth) | {one_by_one:.2f} | {texts / one_by_one:.0f} |",
        f"| worker, one row per claim (like one task per row; once, extrapolated from a twentieth) | {per_row:.2f} | |",
        "",
        "| ratio | value | goal | met |",
        "|---|---:|---|---|",
    ]
    for label, value, goal, form in goals:
        lines.append(f"| {label} | {form.format(value)} | >= {goal} | {'yes' if value >= goal else 'no'} |")
    lines += [
        f"| raw / cold, each repeat | {', '.join(f'{r / c:.2f}' for r, c in zip(times['raw'], times['cold']))} | | |",
        f"| raw `encode()` / (raw + warm pass): the worker's cost besides encoding, against this run's raw "
        f"| {statistics.median(r / (r + w) for r, w in zip(times['raw'], times['warm'])):.2f} | | |",
        f"| the same without the HNSW indexes: what index maintenance leaves of the gap "
        f"| {statistics.median(r / (r + w) for r, w in zip(times['raw'], times['warm_no_index'])):.2f} | | |",
        f"| HNSW inserts' share of the worker's cost besides encoding "
        f"| {statistics.median((w - n) / w for w, n in zip(times['warm'], times['warm_no_index'])):.0%} | | |",
        f"| worker pass cold / warm cache (new rows) | {ratio('cold', 'warm'):.1f} | | |",
        f"| worker per-row claims / batched | {per_row / median['cold']:.1f} | (raw one-by-one / batched: {one_by_one / median['raw']:.1f}) | |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
