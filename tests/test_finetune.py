"""``semantic_finetune`` end to end on a handful of pairs with the tiny random
models: the written model loads back, has a new identity, and switching a
field's alias to it makes the rows stale until the worker re-embeds them;
a trained cross-encoder loads and scores, also through semantic's reranker.

Not transactional, like tests/test_evaluation.py: rows are never committed,
so only embed_stale_rows, run here, embeds them.
"""

import io
import json
import uuid

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.test import override_settings

from semantic.encoders import get_encoder
from semantic.hashing import model_identity
from semantic.worker import embed_stale_rows
from tests.conftest import pending, unique_text
from semantic.training import TRAINING_FILE, TrainingError, load_pairs, split_pairs
from tests.testapp.models import Note

NOTE = Note._meta.get_field("embedding")

SUBJECTS = ["bank", "football", "phone", "film", "election", "weather", "train", "garden"]
PAIRS = [
    (f"{subject} news {n}", f"A report about the {subject}, number {n}: the {subject} story in full, with details.")
    for subject in SUBJECTS
    for n in (1, 2)
]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    return path


def finetune(*args):
    out = io.StringIO()
    call_command("semantic_finetune", *args, stdout=out, verbosity=0)
    return out.getvalue()


# --- pairs ---------------------------------------------------------------------------


def test_load_pairs_from_files_and_callables(tmp_path, pairs_file):
    assert load_pairs(pairs_file) == PAIRS
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('query,positive\nphones,"Mobile phones, sold"\nphones,"Mobile phones, sold"\n')
    assert load_pairs(csv_file) == [("phones", "Mobile phones, sold")]  # duplicates kept once
    assert load_pairs(lambda: [{"anchor": "a", "text": "b"}]) == [("a", "b")]
    assert len(load_pairs("project.demo.evaluation.training_pairs")) == 1561
    with pytest.raises(TrainingError, match="Pair 1 has an empty"):
        load_pairs([("", "x")])
    with pytest.raises(TrainingError, match="needs the keys 'query' and 'positive'"):
        load_pairs([{"question": "x"}])


def test_split_pairs_is_deterministic_and_keeps_a_positive_on_one_side():
    pairs = [(f"q{i}", f"doc {i % 50}") for i in range(400)]
    train, held_out = split_pairs(pairs, 0.2)
    assert {p for _, p in train}.isdisjoint({p for _, p in held_out})
    assert 0.1 < len(held_out) / len(pairs) < 0.3
    assert set(split_pairs(list(reversed(pairs)), 0.2)[1]) == set(held_out)
    assert split_pairs(pairs, 0) == (pairs, [])
    with pytest.raises(TrainingError):
        split_pairs(pairs, 1.0)


# --- the bi-encoder ------------------------------------------------------------------


def test_finetune_writes_a_model_that_replaces_the_old_vectors(db, tmp_path, pairs_file, tiny_model):
    from sentence_transformers import SentenceTransformer

    notes = [Note.objects.create(title=unique_text(q), body=p) for q, p in PAIRS[:5]]
    assert embed_stale_rows(NOTE).written == len(notes)
    query = notes[0].title
    assert Note.objects.semantic_search(query, k=10).count() == len(notes)
    old_fingerprint = NOTE.fingerprint

    output = tmp_path / "tiny-tuned"
    summary = finetune(
        "--pairs", str(pairs_file), "--base", "tiny", "--alias", "tiny-tuned", "--output", str(output),
        "--batch-size", "4", "--eval-split", "0.25",
    )
    # A model directory that loads back, with a record of its training.
    model = SentenceTransformer(str(output), device="cpu")
    assert model.get_embedding_dimension() == settings.TINY_DIMENSIONS
    assert model.max_seq_length == 128  # the base model's own limit is kept
    details = json.loads((output / TRAINING_FILE).read_text())
    assert details["loss"] == "MultipleNegativesRankingLoss" and details["pairs"] + 4 >= len(PAIRS) - 8
    assert model_identity(output) != model_identity(tiny_model)
    # The summary: before/after on the held-out pairs and the settings snippet.
    assert "| tiny (before) |" in summary and "| tiny-tuned (after) |" in summary and "MRR@10" in summary
    assert f'"tiny-tuned": {{"path": "{output}", "dimensions": {settings.TINY_DIMENSIONS}}},' in summary

    # Point the field's alias at the new model: every row is stale, searches
    # leave the old vectors out, and the worker re-embeds them.
    models = {**settings.SEMANTIC["MODELS"], "tiny": {"path": str(output), "dimensions": settings.TINY_DIMENSIONS}}
    with override_settings(SEMANTIC={**settings.SEMANTIC, "MODELS": models}):
        assert NOTE.fingerprint != old_fingerprint
        assert pending(NOTE) == len(notes)
        assert Note.objects.semantic_search(query, k=10).count() == 0
        assert embed_stale_rows(NOTE).written == len(notes)
        assert pending(NOTE) == 0
        found = list(Note.objects.semantic_search(query, k=10).values_list("pk", flat=True))
        assert sorted(found) == sorted(n.pk for n in notes)
        assert all(h.startswith(NOTE.fingerprint) for h in Note.objects.values_list("embedding_vector_hash", flat=True))
        assert get_encoder("tiny").location == str(output)
    # Back on the old model: stale again (nothing of the new model is mixed in).
    assert pending(NOTE) == len(notes)


def test_finetune_refuses_to_overwrite_and_retrains_in_place_with_overwrite(tmp_path, pairs_file):
    output = tmp_path / "model"
    args = ["--pairs", str(pairs_file), "--base", "tiny", "--alias", "t2", "--output", str(output), "--batch-size", "8", "--eval-split", "0"]
    summary = finetune(*args)
    assert "no held-out evaluation" in summary
    first = model_identity(output)
    with pytest.raises(CommandError, match="exists already; pass --overwrite"):
        finetune(*args)
    finetune(*args, "--overwrite", "--seed", "1")
    assert model_identity(output) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # no staging folder left


def test_explicit_held_out_pairs_are_never_trained_on(tmp_path, pairs_file):
    held_out = tmp_path / "held_out.csv"
    held_out.write_text("query,positive\n" + "".join(f'"other {q}","{p}"\n' for q, p in PAIRS[:3]))
    output = tmp_path / "model"
    summary = finetune(
        "--pairs", str(pairs_file), "--eval-pairs", str(held_out), "--base", "tiny", "--alias", "t3",
        "--output", str(output), "--batch-size", "8",
    )
    assert f"on {len(PAIRS) - 3} pairs (3 left out: their positive is held out), evaluating on 3 held-out pairs" in summary
    assert json.loads((output / TRAINING_FILE).read_text())["pairs"] == len(PAIRS) - 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pairs", "missing.jsonl", "--alias", "x"], "No such file: missing.jsonl"),
        (["--pairs-from", "no_such_module.pairs", "--alias", "x"], "Cannot import 'no_such_module'"),
        (["--pairs", "one.jsonl", "--alias", "x", "--base", "tiny", "--eval-split", "0"], "at least 2 pairs; got 1"),
        (["--pairs", "few.jsonl", "--alias", "x", "--base", "nope"], "neither a model directory nor a model alias"),
        (["--pairs", "few.jsonl", "--alias", "tiny", "--base", "tiny"], "Model alias 'tiny' is already configured"),
        (["--pairs", "few.jsonl", "--alias", "x", "--epochs", "0"], "--epochs must be at least 1"),
        (["--pairs", "few.jsonl", "--alias", "x", "--eval-split", "1.5"], "held-out fraction must be in"),
        (["--pairs", "few.jsonl", "--alias", "x", "--cross-encoder", "--negatives", "0"], "--negatives must be at least 1"),
    ],
)
def test_finetune_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "few.jsonl").write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": "d"}\n')
    (tmp_path / "one.jsonl").write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(CommandError, match=message) as info:
        finetune(*args)
    assert "\n" not in str(info.value)


# --- the cross-encoder ---------------------------------------------------------------


@pytest.mark.parametrize("loss, loss_class", [("listwise", "ListNetLoss"), ("binary", "BinaryCrossEntropyLoss")])
def test_train_a_cross_encoder_reranker(tmp_path, pairs_file, tiny_model, loss, loss_class):
    from sentence_transformers import CrossEncoder

    from semantic.rerank import get_reranker

    output = tmp_path / "reranker"
    summary = finetune(
        "--cross-encoder", "--pairs", str(pairs_file), "--base", str(tiny_model), "--retriever", "tiny",
        "--alias", "tiny-reranker", "--output", str(output), "--negatives", "2", "--batch-size", "6",
        "--max-seq-length", "64", "--eval-split", "0.25", "--candidates", "3", "--loss", loss,
    )
    model = CrossEncoder(str(output), device="cpu")
    assert model.num_labels == 1
    scores = model.predict([("bank news", "A report about the bank"), ("bank news", "A garden story")])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    details = json.loads((output / TRAINING_FILE).read_text())
    # Every training pair is a positive, plus two mined negatives per query.
    assert details["loss"] == loss_class and details["examples"] == 3 * details["pairs"]
    assert f"{details['pairs']} positives + {2 * details['pairs']} mined negatives" in summary
    assert details["queries_per_step"] == (2 if loss == "listwise" else None)
    assert "| tiny + tiny-reranker (top 3 reranked) |" in summary
    assert f'"RERANKER": {{"path": "{output}", "max_length": 64}},' in summary
    # semantic's own loader takes it as the configured reranker.
    with override_settings(SEMANTIC={**settings.SEMANTIC, "RERANKER": {"path": str(output), "max_length": 64}}):
        ranked = get_reranker().rerank("bank news", ["A garden story", "A report about the bank"], text_of=str)
        assert len(ranked) == 2


# --- train, check, promote ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_train_check_promote_is_three_commands_and_search_answers_throughout(tmp_path, pairs_file, tiny_model):
    """semantic_finetune --prepare writes the model into MODELS_DIR (an alias by its name) and starts the switch."""
    from sentence_transformers import SentenceTransformer

    from semantic import switching
    from semantic.conf import MODEL_MANIFEST, semantic_settings

    from semantic.slots import Slot
    from tests.conftest import embed_until_idle

    models_dir = tmp_path / "site-models"
    label = "testapp.Note.embedding"
    # Wake-ups to a queue of the test's own: this test runs the worker's steps itself.
    queue = f"semantic-recipe-{uuid.uuid4().hex[:8]}"
    with override_settings(SEMANTIC={**settings.SEMANTIC, "MODELS_DIR": str(models_dir), "SWITCH_POLL_SECONDS": 0, "QUEUE": queue}):
        notes = [Note.objects.create(title=unique_text(q), body=p) for q, p in PAIRS[:6]]
        embed_until_idle(Slot(NOTE))
        query = notes[2].title
        before = list(Note.objects.semantic_search(query, k=10, exact=True).values_list("pk", flat=True))
        assert len(before) == len(notes)
        try:
            # 1. train: the model goes where every process finds it, and the switch starts.
            summary = finetune(
                "--pairs", str(pairs_file), "--base", "tiny", "--alias", "tiny-tuned", "--batch-size", "4",
                "--eval-split", "0.25", "--prepare", label,
            )
            output = models_dir / "tiny-tuned"
            assert json.loads((output / MODEL_MANIFEST).read_text()) == {"dimensions": settings.TINY_DIMENSIONS}
            assert semantic_settings.model_config("tiny-tuned")["path"] == str(output)
            assert "Registered as model alias 'tiny-tuned' (SEMANTIC['MODELS_DIR'])" in summary
            assert f"Prepared the switch of {label} to 'tiny-tuned'" in summary
            slot = switching.next_slot(NOTE)
            assert slot.alias == "tiny-tuned"
            assert list(Note.objects.semantic_search(query, k=10, exact=True).values_list("pk", flat=True)) == before
            embed_until_idle(slot)  # what the workers do
            assert list(Note.objects.semantic_search(query, k=10, exact=True).values_list("pk", flat=True)) == before

            # 2. check: both slots, each with its model.
            queries = tmp_path / "queries.jsonl"
            queries.write_text("".join(json.dumps({"query": n.title, "relevant": [n.pk]}) + "\n" for n in notes))
            out = io.StringIO()
            call_command("semantic_evaluate", label, "--queries", str(queries), "--compare-next", "--modes", "exact", "--json", stdout=out)
            assert set(json.loads(out.getvalue())["modes"]) == {"exact [tiny]", "exact [tiny-tuned]"}

            # 3. promote: every search now ranks by the tuned model.
            call_command("semantic_promote", label, stdout=io.StringIO())
            tuned = SentenceTransformer(str(output), device="cpu")
            found = list(Note.objects.semantic_search(query, k=10, exact=True))
            assert len(found) == len(notes)
            vector = tuned.encode(query, normalize_embeddings=True)
            for row in found:
                text = NOTE.build_text(row)
                assert row.score == pytest.approx(float(tuned.encode(text, normalize_embeddings=True) @ vector), abs=1e-4)

            call_command("semantic_promote", label, "--rollback", stdout=io.StringIO())
            assert list(Note.objects.semantic_search(query, k=10, exact=True).values_list("pk", flat=True)) == before
        finally:
            if switching.switch_state(NOTE) is not None:
                switching.cancel(NOTE)
            switching.forget_switches()
            from tests.workers import purge

            purge(queue)


def test_prepare_needs_the_model_where_every_process_finds_it(tmp_path, pairs_file):
    with pytest.raises(CommandError, match="--prepare needs the model where every process finds it"):
        finetune("--pairs", str(pairs_file), "--base", "tiny", "--alias", "x", "--output", str(tmp_path / "x"), "--prepare", "testapp.Note")
    assert not (tmp_path / "x").exists()  # refused before any training


def test_a_models_dir_alias_is_found_by_name_and_its_manifest_is_checked(tmp_path):
    from semantic.conf import MODEL_MANIFEST, directory_alias

    (tmp_path / "good").mkdir()
    (tmp_path / "good" / MODEL_MANIFEST).write_text(json.dumps({"dimensions": 8, "query_prefix": "query: "}))
    config = directory_alias(tmp_path, "good")
    assert (config["path"], config["dimensions"], config["query_prefix"], config["trust_remote_code"]) == (str(tmp_path / "good"), 8, "query: ", False)
    assert directory_alias(tmp_path, "missing") is None
    assert directory_alias(tmp_path, "../good") is None and directory_alias(tmp_path, "good/..") is None
    assert directory_alias(None, "good") is None
    for manifest, message in (
        ({"path": "/elsewhere"}, "may set only"),
        ({"trust_remote_code": True}, "may set only"),
        ({"dimensions": "8"}, "not of the right type"),
        ({"dimensions": True}, "not of the right type"),
        ([1, 2], "may set only"),
    ):
        (tmp_path / "good" / MODEL_MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ImproperlyConfigured, match=message):
            directory_alias(tmp_path, "good")
    (tmp_path / "good" / MODEL_MANIFEST).write_text("{not json")
    with pytest.raises(ImproperlyConfigured, match="not a readable JSON object"):
        directory_alias(tmp_path, "good")
