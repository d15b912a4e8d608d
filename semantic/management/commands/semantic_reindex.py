"""
``manage.py semantic_reindex``: embed rows now, in this process or on the
Celery workers, with a progress bar, resumable after Ctrl-C.

Staleness lives in the database, so embedding is resumable by nature: a row
embedded before an interruption is fresh and is not claimed again. The
modes that first *mark* rows stale (``--missing``, ``--all``) do so in pages
of primary keys, one short UPDATE each, and remember in the cache how far
they got, so that running the same command again continues instead of
marking (and, with ``--force``, re-encoding) rows this run already did.
"""

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field as dataclass_field
from functools import reduce
from operator import or_

from django.core.exceptions import FieldDoesNotExist
from django.core.management.base import CommandError
from django.db import models, reset_queries
from tqdm import tqdm

from semantic import cache as embedding_cache
from semantic.conf import semantic_settings
from semantic.management.commands._shared import LABEL_HELP, SemanticCommand, field_label, first_line, resolve_fields
from semantic.status import FAILED, FRESH, NO_TEXT, count_statuses, stale_mark, status_q
from semantic.wakeups import enqueue_embedding
from semantic.worker import embed_batch

logger = logging.getLogger("semantic")

# Rows per UPDATE when marking rows stale: each page is one short statement
# in its own transaction, so no lock is held on more than a page of rows.
MARK_PAGE = 1000
# How long an interrupted --all/--missing run can be continued.
RESUME_TIMEOUT = 7 * 24 * 60 * 60
RESUME_PREFIX = "semantic:reindex:"
INTERRUPTED = 130  # the exit status of a process stopped by SIGINT


# --- which rows a mode marks ---------------------------------------------------


def may_have_text(field):
    """A Q true for every row whose source text may be non-empty, or None when SQL cannot tell.

    Only when every source is a text column: a row where all of them are
    NULL or '' surely has no text. Rows of whitespace only pass; the worker
    finds them empty and clears them.
    """
    names = field.source_names()
    if not names:
        return None  # a callable
    terms = []
    for name in names:
        try:
            column = field.model._meta.get_field(name)
        except FieldDoesNotExist:
            return None  # a property or a method
        if not isinstance(column, (models.CharField, models.TextField)):
            return None
        terms.append(models.Q(**{f"{column.name}__isnull": False}) & ~models.Q(**{column.name: ""}))
    return reduce(or_, terms)


def rows_to_mark(field, mode):
    """A Q for the rows ``mode`` marks stale, or None for every row.

    ``missing``: rows without a vector that the worker cannot see because
    they were never hashed (they existed before the field, or were written
    with raw SQL). ``failed``: rows set aside as failed. ``all``: every row
    that has or may have text.
    """
    if mode == "failed":
        return status_q(field, FAILED)
    text = may_have_text(field)
    if mode == "missing":
        never_hashed = models.Q(**{f"{field.attname}__isnull": True, f"{field.source_hash_attname}__isnull": True})
        return never_hashed if text is None else never_hashed & text
    hashed = models.Q(**{f"{field.source_hash_attname}__isnull": False})
    return None if text is None else hashed | text


def pk_pages(queryset, page_size, after=None):
    """``(after, last)`` bounds of consecutive primary-key pages of ``queryset``.

    A page holds the rows with ``after < pk <= last``; the final page has
    ``last`` None (everything after ``after``). Keyset paging: each bound is
    found through the primary key index, never with a growing OFFSET.
    """
    while True:
        rest = queryset if after is None else queryset.filter(pk__gt=after)
        bound = list(rest.order_by("pk").values_list("pk", flat=True)[page_size - 1 : page_size])
        last = bound[0] if bound else None
        yield after, last
        if last is None:
            return
        after = last


def in_page(queryset, after, last):
    if after is not None:
        queryset = queryset.filter(pk__gt=after)
    if last is not None:
        queryset = queryset.filter(pk__lte=last)
    return queryset


def forget_cached_vectors(field, rows, using):
    """Delete the cache entries of the vectors ``rows`` hold now, so their texts are encoded again.

    The keys are the row's vector hash (a field without chunks: the same
    string as the cache key) or its chunks' text hashes.
    """
    if field.chunk_model is None:
        hashes = rows.exclude(**{field.vector_hash_attname: None}).values_list(field.vector_hash_attname, flat=True)
    else:
        owners = rows.values("pk")
        hashes = field.chunk_model._base_manager.using(using).filter(owner__in=owners).values_list("text_hash", flat=True)
    try:
        embedding_cache.delete_vectors(hashes)
    except Exception as exc:
        raise CommandError(f"--force could not drop cached vectors (is the cache reachable?): {first_line(exc)}") from exc


# --- resuming ------------------------------------------------------------------


class SavedProgress:
    """How far an --all/--missing run got with one field, kept in the cache.

    ``{"phase": "mark", "after": pk}`` while marking, ``"embed"`` once every
    row is marked, ``"done"`` when the field's stale rows are embedded. A
    run that completes deletes it; the encoder settings changing (another
    fingerprint) makes it void. Without a reachable cache nothing is saved
    and a re-run starts over.
    """

    def __init__(self, field, using, mode):
        self.key = f"{RESUME_PREFIX}{using}:{field.model._meta.label_lower}.{field.name}:{mode}"
        self.fingerprint = field.fingerprint

    def load(self):
        try:
            state = embedding_cache.get_record(self.key)
        except Exception:
            return None
        if state is not None and state.get("fingerprint") == self.fingerprint:
            return state
        return None

    def save(self, phase, after=None):
        try:
            embedding_cache.set_record(self.key, {"fingerprint": self.fingerprint, "phase": phase, "after": after}, RESUME_TIMEOUT)
        except Exception:
            logger.warning("semantic: could not save reindex progress; a re-run will start over", exc_info=True)

    def clear(self):
        try:
            embedding_cache.delete_key(self.key)
        except Exception:
            logger.debug("semantic: could not clear reindex progress", exc_info=True)


class StopAfterBatch:
    """Ctrl-C asks to stop after the batch in hand; a second Ctrl-C stops at once.

    Stopping between batches wastes nothing: no claimed batch is thrown away
    half encoded. Outside the main thread (where signals cannot be caught)
    Ctrl-C interrupts at once, which is still safe: a claim is one
    transaction and rolls back.
    """

    def __init__(self, notify):
        self.notify = notify
        self.requested = False
        self.installed = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self.installed = True
        return self

    def __exit__(self, *exc_info):
        if self.installed:
            # None: a handler not set from Python; the default is the closest.
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.notify()

    def check(self):
        if self.requested:
            raise KeyboardInterrupt


# --- reporting -----------------------------------------------------------------


@dataclass
class FieldReport:
    label: str
    phase: str = "marking"
    rows: int = 0
    to_embed: int = 0
    skipped: int = 0  # fresh already: nothing to do
    no_text: int = 0
    marked: int = 0
    written: int = 0  # embedded, or confirmed unchanged (vector kept)
    failed: list = dataclass_field(default_factory=list)
    seconds: float = 0.0
    stats: dict = dataclass_field(default_factory=lambda: dict.fromkeys(embedding_cache.STAT_NAMES, 0))

    @property
    def done(self):
        return self.written + len(self.failed)


def stats_delta(before, after):
    return {name: after[name] - before[name] for name in embedding_cache.STAT_NAMES}


class Command(SemanticCommand):
    help = (
        "Embed the rows of embedding fields now, in this process, with a progress bar (or with --async "
        "on the Celery workers). By default only stale rows: new rows, edited texts, and rows whose "
        "vector another model or other settings made. Ctrl-C stops after the current batch; running "
        "the same command again continues where it stopped, and never encodes a row again that is "
        "already fresh."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "labels",
            nargs="*",
            metavar="label",
            help=f"What to embed: {LABEL_HELP}. A model means all its embedding fields. Default: every embedding field.",
        )
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--stale",
            dest="mode",
            action="store_const",
            const="stale",
            help="(default) Embed the rows the workers would: rows with text whose vector is missing or out of date.",
        )
        mode.add_argument(
            "--missing",
            dest="mode",
            action="store_const",
            const="missing",
            help="First find rows with text but no vector that no worker knows about, because they were never "
            "hashed (rows that existed before the field was added, or were inserted with raw SQL); mark them "
            "stale, then embed as --stale does.",
        )
        mode.add_argument(
            "--failed",
            dest="mode",
            action="store_const",
            const="failed",
            help="Retry the rows set aside as failed (their text could not be encoded MAX_ATTEMPTS times; "
            "semantic_status shows why): mark them stale, then embed as --stale does.",
        )
        mode.add_argument(
            "--all",
            dest="mode",
            action="store_const",
            const="all",
            help="Check every row again: mark it stale, then embed. This catches text edited behind the ORM. A "
            "row whose text and model are unchanged keeps its vector (only its hash is confirmed), and a text "
            "the embedding cache holds is not encoded again; use --force to encode everything anew.",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Implies --all. Also drop the rows' cached vectors and encode every text again with the model "
            "loaded now: for when the model files changed but the fingerprint did not (a pinned 'revision').",
        )
        parser.add_argument(
            "--restart",
            action="store_true",
            help="Start an interrupted --all or --missing run over instead of continuing it.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help="Rows claimed per transaction and encoded in one encode() call (default: SEMANTIC['CLAIM_SIZE'], 256 "
            "unless set). Smaller batches stop sooner on Ctrl-C; larger ones encode faster.",
        )
        parser.add_argument(
            "--async",
            dest="run_async",
            action="store_true",
            help="Queue the work for the Celery workers and return at once (the marking of --missing and --all "
            "still runs here). Watch it with semantic_status.",
        )
        parser.add_argument("--no-progress", action="store_true", help="No progress bar (it is drawn on stderr).")

    def run(self, *, labels, database, mode, force, restart, batch_size, run_async, **options):
        # tqdm draws on the raw streams: Django's OutputWrapper ends every write with a newline.
        self.out = options.get("stdout") or sys.stdout
        self.err = options.get("stderr") or sys.stderr
        if force:
            if mode not in (None, "all"):
                raise CommandError("--force re-encodes every row: it goes with --all, not --%s." % mode)
            mode = "all"
        mode = mode or "stale"
        if restart and mode == "stale":
            raise CommandError("--restart goes with --all or --missing (--stale has nothing to restart).")
        if batch_size is not None and batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        fields = resolve_fields(labels, database)
        self.using = database
        self.mode = mode
        self.force = force
        self.restart = restart
        self.batch_size = batch_size
        self.show_progress = options["verbosity"] >= 1 and not options["no_progress"]
        self.quiet = options["verbosity"] < 1
        self.reports = []
        progress_key = "all-force" if force else mode
        saved = {field: SavedProgress(field, database, progress_key) if mode != "stale" else None for field in fields}
        with StopAfterBatch(self.announce_stop) as self.stop:
            try:
                for field in fields:
                    (self.enqueue if run_async else self.embed)(field, saved[field])
            except KeyboardInterrupt:
                self.interrupted(fields)
        for progress in saved.values():
            if progress is not None:
                progress.clear()  # finished: the next run starts afresh
        if not run_async:
            self.summary()

    # --- one field -----------------------------------------------------------------

    def mark(self, field, progress, report):
        """Mark the mode's rows of ``field`` stale, page by page, continuing a saved run."""
        state = None if self.restart else progress.load()
        if state and state["phase"] != "mark":
            self.say(f"{report.label}: continuing an interrupted --{self.mode} run (every row is marked already).")
            return
        after = state["after"] if state else None
        if after is not None:
            self.say(f"{report.label}: continuing an interrupted --{self.mode} run after pk {after} (--restart starts over).")
        manager = field.model._base_manager.using(self.using)
        condition = rows_to_mark(field, self.mode)
        # With --force the vector hashes match no text either: the worker
        # cannot confirm the old vectors and encodes every text again.
        values = stale_mark(field, forget_vectors=self.force)
        total = in_page(manager.all(), after, None).count()
        with self.progress_bar(total, f"{report.label} marking") as bar:
            for page_after, page_last in pk_pages(manager.all(), MARK_PAGE, after):
                self.stop.check()
                page = in_page(manager.all(), page_after, page_last)
                rows = page if condition is None else page.filter(condition)
                if self.force:
                    forget_cached_vectors(field, rows, self.using)
                report.marked += rows.update(**values)
                if page_last is not None:
                    progress.save("mark", after=page_last)
                bar.update(MARK_PAGE if page_last is not None else total - bar.n)
                reset_queries()
        progress.save("embed")

    def start(self, field, progress):
        """Mark rows when the mode says so, then count; returns the field's report."""
        report = FieldReport(field_label(field))
        self.reports.append(report)
        if progress is not None:
            self.mark(field, progress, report)
        report.phase = "counting"
        counts = count_statuses(field, using=self.using)
        report.phase = "embedding"
        report.rows = counts["rows"]
        report.to_embed = counts["pending"]
        report.skipped = counts[FRESH]
        report.no_text = counts[NO_TEXT]
        marked = f", {report.marked:,} marked stale by this run" if report.marked else ""
        failed = f"; {counts[FAILED]:,} failed, set aside (--failed retries them)" if counts[FAILED] else ""
        self.say(
            f"{report.label}: {report.to_embed:,} of {report.rows:,} rows to embed{marked} "
            f"({report.skipped:,} fresh already, skipped{failed}; {report.no_text:,} without text)."
        )
        return report

    def embed(self, field, progress):
        report = self.start(field, progress)
        if report.to_embed:
            stats_before = embedding_cache.get_stats(field.encoder.fingerprint)
            started = time.monotonic()
            try:
                self.embed_loop(field, report)
            finally:
                report.seconds = time.monotonic() - started
                report.stats = stats_delta(stats_before, embedding_cache.get_stats(field.encoder.fingerprint))
            self.say(self.field_summary(report))
        if progress is not None:
            progress.save("done")

    def embed_loop(self, field, report):
        """Claim and embed batches until no stale row is left to claim."""
        with self.progress_bar(report.to_embed, report.label) as bar:
            while True:
                self.stop.check()
                result = embed_batch(field, self.using, self.batch_size, skip=report.failed)
                reset_queries()  # with DEBUG on, Django would keep every statement (and its vectors)
                if not result.claimed:
                    return
                report.written += result.written
                report.failed.extend(result.failed)
                if report.done > bar.total:
                    bar.total = report.done  # rows saved meanwhile
                bar.update(report.done - bar.n)

    def enqueue(self, field, progress):
        report = self.start(field, progress)
        if progress is not None:
            progress.save("done")
        if not report.to_embed:
            return
        if not enqueue_embedding(field.model, field.name, self.using, force=True):
            raise CommandError(
                f"Could not queue {report.label} on the Celery broker (see the warning above); its rows stay "
                f"stale. Run without --async to embed them in this process."
            )
        self.say(
            f"{report.label}: queued for the workers on queue {semantic_settings.QUEUE!r}; "
            f"`manage.py semantic_status` shows how many rows are left."
        )

    # --- output ----------------------------------------------------------------------

    def say(self, message):
        if not self.quiet:
            tqdm.write(message, file=self.out)

    def progress_bar(self, total, label):
        return tqdm(
            total=total,
            desc=label,
            unit=" rows",
            dynamic_ncols=True,
            mininterval=0.5,
            file=self.err,
            disable=not self.show_progress,
        )

    def announce_stop(self):
        tqdm.write("Stopping after the current batch (Ctrl-C again to stop at once)...", file=self.err)

    def field_summary(self, report):
        rate = report.done / report.seconds if report.seconds else 0
        stats = report.stats
        failed = f", {self.style.ERROR(f'{len(report.failed):,} failed')}" if report.failed else ", 0 failed"
        return (
            f"{report.label}: {report.done:,} rows in {report.seconds:.1f} s ({rate:,.0f} rows/s): "
            f"{report.written:,} embedded or confirmed unchanged{failed}; "
            f"{stats['texts_encoded']:,} texts encoded, {stats['hits']:,} cache hits, {stats['misses']:,} misses."
        )

    def summary(self):
        total = {name: sum(report.stats[name] for report in self.reports) for name in embedding_cache.STAT_NAMES}
        written = sum(report.written for report in self.reports)
        skipped = sum(report.skipped for report in self.reports)
        failed = sum(len(report.failed) for report in self.reports)
        self.say(
            self.style.SUCCESS("Done: ")
            + f"{written:,} rows embedded or confirmed unchanged, {skipped:,} fresh rows skipped, "
            f"{total['texts_encoded']:,} texts encoded, {total['hits']:,} cache hits, {failed:,} failed."
        )
        if failed:
            raise CommandError(
                f"{failed:,} row(s) could not be encoded (see the log, or semantic_status for the errors); a row "
                f"is set aside as failed after {semantic_settings.MAX_ATTEMPTS} attempts.",
                returncode=1,
            )

    def interrupted(self, fields):
        if self.reports:
            report = self.reports[-1]
            if report.seconds:
                self.say(self.field_summary(report))
            if report.phase == "marking":
                where = f"while marking {report.label} stale ({report.marked:,} rows marked)"
            else:
                where = f"in {report.label} after {report.done:,} of {report.to_embed:,} rows"
            left = len(fields) - len(self.reports)
            later = f"; {left} more field(s) not started" if left else ""
            self.stderr.write(f"Interrupted {where}{later}.")
        again = "run the same command again to continue where it stopped"
        if self.mode != "stale":
            again += " (--restart starts this --%s run over)" % ("all --force" if self.force else self.mode)
        raise CommandError(f"Interrupted; nothing is lost: {again}.", returncode=INTERRUPTED)
