"""The core promise under random concurrent edits, against real services.

Invariant: once the workers go idle, every row is fresh (or has no text, or
is failed because its text was built to fail), its stored vector and every
chunk vector are what sentence-transformers gives for its current text, no
chunk outlives its row, and the status counts from the one definition agree
with a count done here in Python.

Hypothesis drives random sequences of every way a row's text changes
(create, save, save(update_fields=...), update(), bulk_update, bulk_create,
delete, raw SQL edits found by the rehash sweep, mark_stale, emptying a text
and restoring it, texts too long to embed, and edits made *while* a worker
encodes the row) against two real Celery worker processes, whose encoder is
slowed so that edits land inside encoding. The run is derandomized (one
fixed sequence per run) and bounded for CI; run it longer with
``SEMANTIC_STATEFUL_EXAMPLES=50 SEMANTIC_STATEFUL_STEPS=40 pytest tests/test_stateful.py``.
"""

import os
import random
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from django.conf import settings
from django.db import connection
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from semantic.chunking import Chunker
from semantic.status import FAILED, FRESH, NO_TEXT, count_statuses, embedding_status
from semantic.tasks import sweep
from semantic.worker import lock_namespace
from tests.testapp.models import Draft
from tests.workers import purge, start_worker_process, stop

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES = int(os.environ.get("SEMANTIC_STATEFUL_EXAMPLES", "5"))
STEPS = int(os.environ.get("SEMANTIC_STATEFUL_STEPS", "30"))
QUEUE = "semantic-stateful"
ENCODE_DELAY = 0.25
FIELD = Draft._meta.get_field("embedding")

# Words of one token each in the tiny model's vocabulary, so that a text's
# chunk count follows its word count: up to 55 words stay within Draft's
# max_chunks (6 windows of 14 tokens, 4 shared), 120 words never do.
WORDS = "river market garden winter music school city harbour forest letter bridge station".split()
titles = st.lists(st.sampled_from(WORDS), max_size=5).map(" ".join)
bodies = st.one_of(st.none(), st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join))
POISON_WORDS = 120
poisons = st.lists(st.sampled_from(WORDS), min_size=POISON_WORDS, max_size=POISON_WORDS).map(" ".join)
rows = st.integers(min_value=0, max_value=10**6)
# The ways one row's text is edited (see WritePaths.write).
PATHS = ["save", "save_update_fields", "update", "bulk_update", "bulk_update_body", "raw_sql", "raw_sql_and_mark_stale"]

# Edits that landed while a worker held the row's claim, over the whole run.
landed_during_encoding = []


def is_poison(text):
    return len(text.split()) >= POISON_WORDS


def being_encoded(pk):
    """Whether a worker holds the claim (the advisory lock) on row ``pk`` right now."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2"
            " AND classid::bigint = (%s::bigint & 4294967295) AND objid::bigint = (hashtext(%s)::bigint & 4294967295))",
            [lock_namespace(FIELD), str(pk)],
        )
        return cursor.fetchone()[0]


class WritePaths(RuleBasedStateMachine):
    """Random writes to Draft rows while two workers embed them."""

    @initialize(texts=st.lists(st.tuples(titles, bodies), min_size=3, max_size=8))
    def start_with_some_rows(self, texts):
        Draft.objects.all().delete()
        Draft.objects.bulk_create([Draft(title=title, body=body) for title, body in texts])
        # Rows edited behind the ORM since the last rehash sweep: only that
        # sweep can find them. Every other row must be right without it.
        self.raw_edited = set()

    def pick(self, index):
        pks = list(Draft.objects.order_by("pk").values_list("pk", flat=True))
        return pks[index % len(pks)] if pks else None

    def has_rows(self):
        return Draft.objects.exists()

    # --- the ways a row is written --------------------------------------------------

    @rule(title=titles, body=bodies)
    def create(self, title, body):
        Draft.objects.create(title=title, body=body)

    @rule(texts=st.lists(st.tuples(titles, bodies), min_size=1, max_size=4))
    def bulk_create(self, texts):
        Draft.objects.bulk_create([Draft(title=title, body=body) for title, body in texts])

    @precondition(has_rows)
    @rule(index=rows, path=st.sampled_from(PATHS), title=st.one_of(st.none(), titles), body=bodies)
    def edit(self, index, path, title, body):
        self.write(path, self.pick(index), title, body)

    @precondition(has_rows)
    @rule(indexes=st.lists(rows, min_size=2, max_size=4), title=titles, body=bodies, whole=st.booleans())
    def bulk_update_rows(self, indexes, title, body, whole):
        objs = list(Draft.objects.filter(pk__in={self.pick(i) for i in indexes}))
        for obj in objs:
            obj.title, obj.body = title, body
        # ["title", "body"] writes the whole text (and its hash); ["body"] only part of it.
        Draft.objects.bulk_update(objs, ["title", "body"] if whole else ["body"])

    @precondition(has_rows)
    @rule(index=rows, raw=st.booleans())
    def delete(self, index, raw):
        pk = self.pick(index)
        if raw:
            with connection.cursor() as cursor:
                cursor.execute("DELETE FROM testapp_draft WHERE id = %s", [pk])
        else:
            Draft.objects.filter(pk=pk).delete()

    @precondition(has_rows)
    @rule(index=rows)
    def mark_stale(self, index):
        Draft.objects.filter(pk=self.pick(index)).mark_stale()

    @precondition(has_rows)
    @rule(index=rows)
    def empty_and_back(self, index):
        row = Draft.objects.get(pk=self.pick(index))
        Draft.objects.filter(pk=row.pk).update(title="", body=None)
        time.sleep(0.1)
        Draft.objects.filter(pk=row.pk).update(title=row.title, body=row.body)

    @precondition(has_rows)
    @rule(index=rows, body=poisons)
    def make_unembeddable(self, index, body):
        Draft.objects.filter(pk=self.pick(index)).update(body=body)

    @precondition(lambda self: self.raw_edited)
    @rule()
    def nightly_sweep(self):
        sweep(rehash=True)
        self.raw_edited.clear()

    @precondition(has_rows)
    @rule(index=rows, first=bodies, edits=st.lists(st.tuples(st.sampled_from(PATHS), bodies), min_size=1, max_size=2))
    def edit_while_encoding(self, index, first, edits):
        """Mark a row with a new text, wait until a worker encodes it, then edit it (once or twice)."""
        pk = self.pick(index)
        # Words no run has used: a text the embedding cache (which outlives
        # test runs) holds would not be encoded, leaving nothing to land in.
        rng = random.Random(uuid.uuid4().int)
        first = " ".join(filter(None, [first, *(rng.choice(WORDS) for _ in range(8))]))
        Draft.objects.filter(pk=pk).update(body=first)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not being_encoded(pk):
            time.sleep(0.01)
        for path, body in edits:
            if being_encoded(pk):
                landed_during_encoding.append(path)
            self.write(path, pk, None, body)

    def write(self, path, pk, title, body):
        """Give row ``pk`` a new body (and title, unless None) by ``path``."""
        if path in ("raw_sql", "raw_sql_and_mark_stale"):
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE testapp_draft SET body = %s, title = coalesce(%s, title) WHERE id = %s", [body, title, pk]
                )
            if path == "raw_sql":
                self.raw_edited.add(pk)
            else:
                Draft.objects.filter(pk=pk).mark_stale()
            return
        if path == "update":
            Draft.objects.filter(pk=pk).update(body=body, **({} if title is None else {"title": title}))
            return
        row = Draft.objects.filter(pk=pk).first()
        if row is None:
            return
        row.body = body
        if title is not None:
            row.title = title
        if path == "save":
            row.save()
        elif path == "save_update_fields":
            row.save(update_fields=["body"] if title is None else ["title", "body"])
        elif path == "bulk_update":
            Draft.objects.bulk_update([row], ["title", "body"])
        elif path == "bulk_update_body":
            Draft.objects.bulk_update([row], ["body"])
        else:
            raise AssertionError(path)

    # --- the invariant, once the workers are idle ------------------------------------

    def teardown(self):
        wait_for_idle_workers()
        check_every_row(except_pks=self.raw_edited)
        if self.raw_edited:
            sweep(rehash=True)  # the nightly sweep finds the edits made behind the ORM
            wait_for_idle_workers()
            check_every_row()


def wait_for_idle_workers():
    deadline = time.monotonic() + 120
    while count_statuses(FIELD)["pending"]:
        # What Celery beat does every few minutes: wake a worker for pending
        # rows; a row whose text fails is tried once per task.
        sweep()
        assert time.monotonic() < deadline, f"the workers did not go idle: {count_statuses(FIELD)}"
        time.sleep(1)


def check_every_row(except_pks=()):
    """The invariant (module docstring); rows in ``except_pks`` are only counted."""
    model = oracle()
    chunker = Chunker(FIELD.encoder, FIELD.overlap)
    states = Counter()
    rows = list(Draft.objects.order_by("pk"))
    for row in rows:
        state = embedding_status(FIELD, row)
        states[state] += 1
        if row.pk in except_pks:
            continue
        text = FIELD.build_text(row)
        chunks = list(row.embedding_chunks.order_by("index"))
        if not text:
            assert state == NO_TEXT, (row.pk, state)
            assert row.embedding is None and row.embedding_vector_hash is None and chunks == []
            continue
        if is_poison(text):
            assert state == FAILED, (row.pk, state)
            assert "more than max_chunks (6)" in row.embedding_error
            continue
        assert state == FRESH, (row.pk, state, text)
        assert row.embedding_source_hash == FIELD.compute_source_hash(row)
        expected = chunker.split(text)
        assert [(c.index, c.start, c.end, c.text) for c in chunks] == [(e.index, e.start, e.end, e.text) for e in expected]
        vectors = model.encode([e.text for e in expected], normalize_embeddings=True)
        assert np.allclose([c.embedding for c in chunks], vectors, atol=1e-5), row.pk
        mean = np.average(vectors.astype(np.float64), axis=0, weights=[e.tokens for e in expected])
        assert np.allclose(row.embedding, mean / np.linalg.norm(mean), atol=1e-5), row.pk
    orphans = FIELD.chunk_model.objects.exclude(owner_id__in=Draft.objects.values("pk"))
    assert not orphans.exists()
    counts = count_statuses(FIELD)
    assert {state: counts[state] for state in counts if state not in ("rows", "pending", "with_text")} == {
        state: states[state] for state in counts if state not in ("rows", "pending", "with_text")
    }
    assert counts["rows"] == len(rows) and counts["pending"] == 0


_oracle = []


def oracle():
    """sentence-transformers itself, with the tiny_short alias's settings: not the app's encoder."""
    if not _oracle:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(settings.TINY_MODEL_DIR), device="cpu")
        model.max_seq_length = settings.SEMANTIC["MODELS"]["tiny_short"]["max_seq_length"]
        _oracle.append(model)
    return _oracle[0]


@pytest.fixture
def two_slow_workers(tmp_path, settings):
    settings.SEMANTIC = {**settings.SEMANTIC, "QUEUE": QUEUE}
    workers = [start_worker_process(f"stateful{i}", tmp_path, QUEUE, encode_delay=ENCODE_DELAY) for i in range(2)]
    yield workers
    for worker in workers:
        stop(worker)
    purge(QUEUE)


def test_every_row_ends_with_the_vector_of_its_current_text(two_slow_workers):
    landed_during_encoding.clear()
    run_state_machine_as_test(
        WritePaths,
        settings=hypothesis_settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    assert all(worker.poll() is None for worker in two_slow_workers), "a worker process died"
    # The run proved something about the race only if edits hit encoding.
    assert landed_during_encoding, "no edit landed while a worker was encoding its row"
