"""Retrieval metrics against hand-computed values, labelled-query files, and
``semantic_evaluate`` end to end on a few rows with the tiny random model.

The database tests are not transactional: their rows are never committed, so
no Celery worker (an in-thread one started by another test module) can embed
them; embed_stale_rows runs here, in the test's own transaction.
"""

import functools
import io
import json
import math

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from project.demo import evaluation as bbc
from semantic.evaluation import (
    LabelledQuery,
    evaluate,
    evaluate_pairs,
    format_table,
    load_queries,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    score_rankings,
)
from semantic.worker import embed_stale_rows
from tests.conftest import unique_text
from tests.testapp.models import Note

NOTE = Note._meta.get_field("embedding")


# --- metrics ---------------------------------------------------------------------


def test_recall_counts_relevant_ids_found_in_the_first_k():
    ranked = [5, 3, 9, 1, 7]
    assert recall_at_k(ranked, {3, 7}, 1) == 0.0
    assert recall_at_k(ranked, {3, 7}, 2) == 0.5
    assert recall_at_k(ranked, {3, 7}, 5) == 1.0
    assert recall_at_k(ranked, {3, 7, 4}, 10) == pytest.approx(2 / 3)
    assert recall_at_k([], {1}, 10) == 0.0
    assert recall_at_k(ranked, set(), 10) == 0.0  # nothing relevant: nothing to find


def test_mrr_is_the_reciprocal_rank_of_the_first_relevant_id_within_k():
    assert mrr_at_k(["a", "b", "c"], {"a"}) == 1.0
    assert mrr_at_k(["a", "b", "c"], {"c", "b"}) == 0.5
    assert mrr_at_k(list(range(20)), {10}, k=10) == 0.0  # rank 11: beyond the cut
    assert mrr_at_k(list(range(20)), {9}, k=10) == 0.1
    assert mrr_at_k([1, 2, 3], {4}) == 0.0  # not found


def test_ndcg_with_binary_relevance():
    # One relevant id at rank 3: DCG = 1/log2(4) = 0.5, ideal 1/log2(2) = 1.
    assert ndcg_at_k(["x", "y", "r"], {"r"}) == pytest.approx(0.5)
    # Two relevant at ranks 1 and 3: (1 + 0.5) / (1 + 1/log2(3)).
    assert ndcg_at_k(["r1", "y", "r2"], {"r1", "r2"}) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # More relevant ids than k: the ideal ranking fills all k places.
    assert ndcg_at_k(["a", "b"], {"a", "b", "c"}, k=2) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "b"], {"z"}) == 0.0
    assert ndcg_at_k(["a", "b"], set()) == 0.0


def test_a_repeated_id_counts_once_where_it_first_appears():
    # The ranking is taken as given; a duplicate does not push the relevant
    # id down a place, nor count twice.
    assert mrr_at_k(["a", "a", "r"], {"r"}) == 0.5
    assert recall_at_k(["r", "r", "x"], {"r", "s"}, 2) == 0.5
    assert ndcg_at_k(["r", "r", "s"], {"r", "s"}) == pytest.approx(1.0)


def test_ids_compare_as_strings():
    assert mrr_at_k([1, 2, 3], {"2"}) == 0.5
    assert recall_at_k(["7"], {7}, 1) == 1.0


def test_score_rankings_averages_over_queries():
    scores = score_rankings([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [{1}, {6}, {10}], k=2)
    assert list(scores) == ["recall@1", "recall@2", "mrr@10", "ndcg@10"]
    assert scores["recall@1"] == pytest.approx(1 / 3)
    assert scores["recall@2"] == pytest.approx(1 / 3)
    assert scores["mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert scores["ndcg@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert list(score_rankings([[1]], [{1}], k=1)) == ["recall@1", "mrr@10", "ndcg@10"]
    with pytest.raises(ValueError):
        score_rankings([[1]], [], k=10)


def test_evaluate_pairs_ranks_positives_by_cosine_and_reranks():
    pairs = [("q0", "d0"), ("q1", "d1"), ("q2", "d2")]
    # Query i is closest to document (i + 1) % 3, then to its own document.
    documents = {"d0": [1, 0, 0], "d1": [0, 1, 0], "d2": [0, 0, 1]}
    queries = {"q0": [0.6, 0.8, 0], "q1": [0, 0.6, 0.8], "q2": [0.8, 0, 0.6]}

    def encode(texts, query):
        return np.array([(queries if query else documents)[text] for text in texts], dtype=float)

    plain = evaluate_pairs(pairs, encode, k=1)
    assert plain["recall@1"] == 0.0
    assert plain["mrr@10"] == pytest.approx(0.5)
    # A reranker that knows the answer puts each positive first.
    reranked = evaluate_pairs(pairs, encode, k=1, rerank=lambda q, texts: [float(t[1] == q[1]) for t in texts], candidates=2)
    assert reranked["recall@1"] == 1.0
    assert reranked["mrr@10"] == 1.0


def test_format_table():
    table = format_table([("exact", {"mrr@10": 0.5, "ms_per_query": 1.25})], ["mrr@10"])
    assert table.splitlines() == ["| mode | mrr@10 | ms per query |", "|---|---:|---:|", "| exact | 0.500 | 1.2 |"]


# --- labelled queries ------------------------------------------------------------


def test_load_queries_from_jsonl_csv_and_callables(tmp_path):
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"query": "phones", "relevant": [1, 2]}\n\n{"query": " tax ", "relevant": "s/3.txt"}\n')
    assert load_queries(jsonl) == [LabelledQuery("phones", frozenset({"1", "2"})), LabelledQuery("tax", frozenset({"s/3.txt"}))]
    csv_file = tmp_path / "q.csv"
    csv_file.write_text('query,relevant\nphones,1|2\n"tax, vat",7\n')
    assert load_queries(str(csv_file)) == [LabelledQuery("phones", frozenset({"1", "2"})), LabelledQuery("tax, vat", frozenset({"7"}))]
    assert load_queries(lambda: [("q", [3])]) == [LabelledQuery("q", frozenset({"3"}))]
    assert load_queries("project.demo.evaluation.held_out_queries")[0].relevant == {bbc.bbc_split().held_out[0].source_file}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"query": "a"}\n', "needs the keys 'query' and 'relevant'"),
        ('{"query": "", "relevant": [1]}\n', "has no query text"),
        ('{"query": "a", "relevant": []}\n', "has no relevant ids"),
        ("not json\n", "line 1: not JSON"),
        ("", "No labelled queries"),
    ],
)
def test_bad_labelled_queries_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_queries(path)


def test_missing_files_and_bad_dotted_paths(tmp_path):
    with pytest.raises(ValueError, match="No such file"):
        load_queries(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="Cannot import"):
        load_queries("no_such_module.queries")
    with pytest.raises(ValueError, match="has no 'nothing'"):
        load_queries("project.demo.evaluation.nothing")


def test_the_bbc_split_is_fixed_and_disjoint():
    split = bbc.bbc_split()
    assert len(split.held_out) == bbc.HELD_OUT == 500
    # 2,225 files, 2,061 distinct stories (a repeated headline or body is one story).
    assert len(split.train) == 2061 - 500
    texts = [a.title for a in split.train + split.held_out] + [a.body for a in split.train + split.held_out]
    assert len(set(texts)) == len(texts)
    assert not {a.source_file for a in split.train} & {a.source_file for a in split.held_out}
    # Fixed by the salted hash: these are the same on every machine.
    assert [a.source_file for a in split.held_out[:3]] == FIRST_HELD_OUT
    assert {a.topic for a in split.held_out[:50]} == {"business", "entertainment", "politics", "sports", "tech"}
    query, body = bbc.training_pairs(1)[0]
    assert query == split.train[0].title and body == split.train[0].body and query not in body[:len(query)]


FIRST_HELD_OUT = ["business/259.txt", "tech/400.txt", "tech/249.txt"]


# --- through the ORM ---------------------------------------------------------------


TOPICS = [
    ("zebra crossing safety", "Drivers must stop for pedestrians at a zebra crossing on the high street."),
    ("interest rates", "The central bank raised interest rates by a quarter point to curb inflation."),
    ("football final", "The striker scored twice as the home team won the cup final at the stadium."),
    ("new smartphone", "The company unveiled a smartphone with a folding screen and a longer battery life."),
    ("film festival", "The director's film won the top prize at the festival in Cannes on Sunday."),
    ("election result", "The party won the election with a majority of seats in parliament."),
]


@pytest.fixture
def notes(db):
    rows = [Note.objects.create(title=unique_text(title), body=body) for title, body in TOPICS]
    totals = embed_stale_rows(NOTE)
    assert totals.written == len(rows)
    return rows


def labelled(notes):
    return [{"query": body.split(" ", 3)[-1], "relevant": [note.pk]} for note, (_, body) in zip(notes, TOPICS)]


def test_evaluate_runs_each_mode_through_the_orm(notes, cross_encoder_dir):
    queries = labelled(notes)
    result = evaluate(Note.objects.all(), queries, k=3, reranker=str(cross_encoder_dir))
    assert list(result["modes"]) == ["exact", "vector", "hybrid", "rerank", "fulltext", "fulltext_any"]
    assert result["queries"] == len(TOPICS) and result["rows"] == len(TOPICS) and result["unreachable"] == 0
    assert result["skipped"] == {}
    # The exact mode's figures are the metrics of semantic_search's own rankings.
    rankings = [
        list(Note.objects.semantic_search(q["query"], k=10, exact=True).values_list("pk", flat=True)) for q in queries
    ]
    expected = score_rankings(rankings, [q["relevant"] for q in queries], k=3)
    assert {name: result["modes"]["exact"][name] for name in expected} == pytest.approx(expected)
    # Each query quotes its note's body: full text finds every one first.
    assert result["modes"]["fulltext"]["recall@1"] == 1.0
    for mode in result["modes"].values():
        assert 0 <= mode["mrr@10"] <= 1 and mode["ms_per_query"] > 0


def test_full_text_baselines_need_every_word_or_any_word(notes):
    # "unicorn" is in no note: websearch_to_tsquery needs every word, the
    # any-word baseline ORs them. Operators typed in the query stay words.
    queries = [{"query": "zebra unicorn", "relevant": [notes[0].pk]}, {"query": '-"striker OR" unicorn', "relevant": [notes[2].pk]}]
    result = evaluate(Note.objects.all(), queries, modes=["fulltext", "fulltext_any"])
    assert result["modes"]["fulltext"]["recall@10"] == 0.0
    assert result["modes"]["fulltext_any"]["recall@1"] == 1.0


def test_evaluate_skips_or_refuses_modes_that_cannot_run(notes):
    result = evaluate(Note.objects.all(), labelled(notes)[:2], k=10)
    assert "rerank" not in result["modes"]
    assert result["skipped"]["rerank"].startswith("no reranker")
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="Mode 'rerank' cannot run"):
        evaluate(Note.objects.all(), labelled(notes)[:2], modes=["rerank"])
    with pytest.raises(ValueError, match="Unknown mode"):
        evaluate(Note.objects.all(), labelled(notes)[:2], modes=["sparse"])


def test_evaluate_counts_queries_whose_rows_are_not_searchable(notes):
    queries = [*labelled(notes)[:2], {"query": "anything", "relevant": [10**9]}]
    result = evaluate(Note.objects.filter(pk__in=[n.pk for n in notes]), queries, modes=["exact"])
    assert result["unreachable"] == 1
    assert result["modes"]["exact"]["recall@10"] <= 2 / 3


def test_semantic_evaluate_command_json(notes, tmp_path):
    path = tmp_path / "queries.csv"
    path.write_text("query,relevant\n" + "".join(f"{q['query']},{q['relevant'][0]}\n" for q in labelled(notes)))
    out = io.StringIO()
    call_command("semantic_evaluate", "testapp.Note", "--queries", str(path), "--modes", "exact,fulltext", "--k", "5", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert set(result["modes"]) == {"exact", "fulltext"}
    assert result["metrics"] == ["recall@1", "recall@5", "mrr@10", "ndcg@10"]
    assert result["modes"]["fulltext"]["mrr@10"] == 1.0
    assert result["title"].startswith("testapp.Note.embedding")


def test_semantic_evaluate_command_table(notes, tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in labelled(notes)))
    out = io.StringIO()
    call_command("semantic_evaluate", "testapp.Note.embedding", "--queries", str(path), stdout=out, verbosity=0)
    text = out.getvalue()
    assert "| mode | recall@1 | recall@10 | mrr@10 | ndcg@10 | ms per query |" in text
    assert "| exact |" in text and "| fulltext |" in text
    assert "skipped rerank: no reranker" in text


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Give a label and --queries"),
        (["testapp.Note"], "Give a label and --queries"),
        (["testapp.Nope", "--queries", "x.jsonl"], "Unknown model testapp.Nope"),
        (["testapp.Note", "--queries", "missing.jsonl"], "No such file: missing.jsonl"),
        (["testapp.Note", "--queries", "x.jsonl", "--modes", "exact,sparse"], "Unknown mode"),
        (["testapp.Note", "--queries", "x.jsonl", "--k", "0"], "--k must be at least 1"),
        (["testapp.Note", "--queries", "x.jsonl", "--suite", "a.b"], "either --suite or a label"),
        (["--suite", "project.demo.evaluation.nothing"], "has no 'nothing'"),
        (["testapp.Note", "--queries", "q.jsonl", "--modes", "rerank"], "Mode 'rerank' cannot run"),
    ],
)
def test_semantic_evaluate_errors_are_one_line(db, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"query": "a", "relevant": [1]}\n')
    with pytest.raises(CommandError, match=message) as info:
        call_command("semantic_evaluate", *args, stdout=io.StringIO())
    assert "\n" not in str(info.value)


small_bbc_suite = functools.partial(bbc.bbc_suite, limit=12)


def test_semantic_evaluate_runs_the_bbc_suite(db):
    from django.apps import apps

    out = io.StringIO()
    call_command(
        "semantic_evaluate", "--suite", "tests.test_evaluation.small_bbc_suite", "--model", "tiny", "--json",
        stdout=out, verbosity=0,
    )
    result = json.loads(out.getvalue())
    assert result["queries"] == result["rows"] == 12 and result["unreachable"] == 0
    assert set(result["modes"]) == {"exact", "vector", "hybrid", "fulltext", "fulltext_any"}
    assert "12 held-out articles" in result["title"]
    # Headlines are not in the searched text (bodies only), yet full text
    # finds some of their articles: the task is real, not string matching.
    assert 0 < result["modes"]["fulltext"]["recall@10"] <= result["modes"]["fulltext_any"]["recall@10"] <= 1
    # The temporary table and its model are gone afterwards.
    assert "bbcevaluationarticle" not in apps.all_models["demo"]
    from django.db import connection

    assert bbc.TABLE not in connection.introspection.table_names()
