"""
Search quality on the BBC held-out split: all-MiniLM-L6-v2 out of the box
against the same model fine-tuned here, and vector vs hybrid vs reranked
(with a cross-encoder trained here) vs PostgreSQL full text.

    .venv/bin/python bench/quality.py [--train-pairs 1000] [--reranker-pairs 300] [--rerank-queries 100] [--no-write]

One run trains both models (timed), then evaluates every search mode through
the ORM (semantic.evaluation.evaluate) on project.demo.evaluation.bbc_suite:
the 500 held-out headlines as queries, each to find its own article among
the 500 held-out article bodies (headlines are not in the searched text).
Reranking reads ``--candidates`` rows per query with the cross-encoder,
which is slow on a CPU, so it is measured on the first ``--rerank-queries``
queries, next to the plain vector search on the same queries.

Uses tests.settings with SEMANTIC_TEST_SLOT=14: a throwaway ``test_semantic_14``
database on the embedded PostgreSQL (dropped at the end, even on error) and
Redis database 14 (embeddings of the base model are cached there between
runs). Trained models go to .data/quality/ (``--reuse`` skips training when
they are there). The report goes to stdout and, between markers, into
docs/quality.md.
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

from bench.report import write_section  # noqa: E402
# The test settings on a slot of their own: test database test_semantic_14, Redis database 14.
os.environ.update(DJANGO_SETTINGS_MODULE="tests.settings", SEMANTIC_TEST_SLOT="14")
for name, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)

MODELS_DIR = ROOT / ".data" / "quality"
TIMINGS = MODELS_DIR / "timings.json"  # what the models' own records leave out
TUNED_ALIAS = "bbc-tuned"
DOC = ROOT / "docs" / "quality.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-pairs", type=int, default=1000, help="(headline, body) pairs to fine-tune the bi-encoder on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens per text while training")
    parser.add_argument("--reranker-pairs", type=int, default=300, help="queries to train the cross-encoder on")
    parser.add_argument("--negatives", type=int, default=3, help="mined negatives per reranker query")
    parser.add_argument("--reranker-loss", choices=["listwise", "binary"], default="listwise")
    parser.add_argument("--reranker-learning-rate", type=float, default=2e-4)
    parser.add_argument("--reranker-max-length", type=int, default=128, help="tokens per (query, document) pair")
    parser.add_argument("--candidates", type=int, default=20, help="rows the reranker reads per query")
    parser.add_argument("--rerank-queries", type=int, default=100, help="queries the rerank comparison runs on")
    parser.add_argument("--held-out", type=int, default=None, help="evaluate on the first N held-out articles only (smoke runs)")
    parser.add_argument("--reuse", action="store_true", help="reuse the models in .data/quality/ instead of training")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/quality.md alone")
    args = parser.parse_args()
    log = Log()

    import django

    django.setup()
    from django.conf import settings
    from django.test.utils import setup_databases, teardown_databases

    settings.DEBUG = False  # no query log in memory
    log("creating the test database")
    databases = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    try:
        results = run(args, log)
    finally:
        teardown_databases(databases, verbosity=0)
    results["total_s"] = log.elapsed()
    text = render(args, results)
    print(text)
    if not args.no_write:
        write_section("quality", text, DOC)
        log(f"written to {DOC}")


class Log:
    """Progress lines on stderr, stamped with the seconds since the run began."""

    def __init__(self):
        self.began = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.began

    def __call__(self, message):
        sys.stderr.write(f"[{self.elapsed():7.1f} s] {message}\n")
        sys.stderr.flush()


def run(args, log):
    import torch
    from django.conf import settings
    from django.test.utils import override_settings

    from project.demo.evaluation import bbc_split, bbc_suite, training_pairs
    from semantic.encoders import get_encoder
    from semantic.evaluation import evaluate
    from semantic.training import TRAINING_FILE, TrainingOptions, load_bi_encoder, resolve_base, train_bi_encoder, train_cross_encoder

    results = {"threads": torch.get_num_threads()}
    tuned_dir = MODELS_DIR / TUNED_ALIAS
    reranker_dir = MODELS_DIR / "bbc-reranker"
    pairs = training_pairs(args.train_pairs)
    results["split"] = {"train_pool": len(bbc_split().train), "held_out": len(bbc_split().held_out)}

    def trained(directory):
        return json.loads((directory / TRAINING_FILE).read_text())

    if args.reuse and (tuned_dir / TRAINING_FILE).exists():
        log(f"reusing {tuned_dir}")
    else:
        log(f"fine-tuning MiniLM on {len(pairs)} pairs")
        options = TrainingOptions(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            max_length=args.max_seq_length, overwrite=True,
        )
        train_bi_encoder("default", pairs, tuned_dir, options)
    results["bi_encoder"] = trained(tuned_dir)
    log(f"bi-encoder: {results['bi_encoder']['seconds']} s")

    if args.reuse and (reranker_dir / TRAINING_FILE).exists():
        log(f"reusing {reranker_dir}")
    else:
        reranker_pairs = pairs[: args.reranker_pairs]
        log(f"training the cross-encoder on {len(reranker_pairs)} queries + {args.negatives} mined negatives each")
        location, config = resolve_base("default")
        started = time.perf_counter()
        miner = load_bi_encoder(location, config)
        options = TrainingOptions(
            epochs=args.epochs, batch_size=16, learning_rate=args.reranker_learning_rate,
            max_length=args.reranker_max_length, overwrite=True,
        )
        cross = train_cross_encoder(
            "default", reranker_pairs, reranker_dir, options, miner=miner, miner_config=config,
            negatives=args.negatives, loss=args.reranker_loss,
        )
        TIMINGS.write_text(json.dumps({"reranker_with_mining_s": time.perf_counter() - started}) + "\n")
        del miner, cross
    results["reranker"] = trained(reranker_dir)
    if TIMINGS.exists():
        results.update(json.loads(TIMINGS.read_text()))
    log(f"cross-encoder: {results['reranker']['seconds']} s")

    models = {**settings.SEMANTIC["MODELS"], TUNED_ALIAS: {"path": str(tuned_dir), "dimensions": 384}}
    results["evaluations"] = {}
    with override_settings(SEMANTIC={**settings.SEMANTIC, "MODELS": models, "BATCH_SIZE": 32, "CLAIM_SIZE": 256}):
        for alias in ("default", TUNED_ALIAS):
            log(f"embedding the held-out bodies with {alias!r}")
            started = time.perf_counter()
            with bbc_suite(alias, limit=args.held_out) as suite:
                embedded_s = time.perf_counter() - started
                log(f"evaluating {alias!r}")
                # Full text alone does not depend on the model: measured once.
                text_modes = ["fulltext", "fulltext_any"] if alias == "default" else []
                full = evaluate(
                    suite.queryset, suite.queries, modes=[*text_modes, "exact", "vector", "hybrid"],
                    field=suite.field, id_field=suite.id_field, text_fields=suite.text_fields, progress=True,
                )
                log(f"reranking {args.rerank_queries} queries with {alias!r} candidates")
                subset = evaluate(
                    suite.queryset, suite.queries[: args.rerank_queries], modes=["exact", "rerank"],
                    field=suite.field, id_field=suite.id_field, reranker={"path": str(reranker_dir), "max_length": args.reranker_max_length},
                    candidates=args.candidates, progress=True,
                )
            results["evaluations"][alias] = {"full": full, "subset": subset, "embedded_s": embedded_s}
            results["fingerprint_" + alias] = get_encoder(alias).fingerprint
    return results


def render(args, results):
    from semantic.evaluation import format_table

    evaluations = results["evaluations"]
    base, tuned = evaluations["default"], evaluations[TUNED_ALIAS]
    metrics = base["full"]["metrics"]
    names = {"default": "MiniLM", TUNED_ALIAS: "MiniLM fine-tuned"}
    mode_names = {
        "fulltext": "PostgreSQL full text, all words (as typed)",
        "fulltext_any": "PostgreSQL full text, any word",
        "exact": "vector, exact",
        "vector": "vector, HNSW index",
        "hybrid": "hybrid (RRF)",
        "rerank": f"vector top {args.candidates} + trained cross-encoder",
    }
    rows = [(mode_names[mode], base["full"]["modes"][mode]) for mode in ("fulltext", "fulltext_any")]
    for alias in ("default", TUNED_ALIAS):
        for mode in ("exact", "vector", "hybrid"):
            rows.append((f"{names[alias]}: {mode_names[mode]}", evaluations[alias]["full"]["modes"][mode]))
    subset_rows = []
    for alias in ("default", TUNED_ALIAS):
        for mode in ("exact", "rerank"):
            subset_rows.append((f"{names[alias]}: {mode_names[mode]}", evaluations[alias]["subset"]["modes"][mode]))
    bi, ce = results["bi_encoder"], results["reranker"]
    gain = tuned["full"]["modes"]["exact"]["mrr@10"] - base["full"]["modes"]["exact"]["mrr@10"]
    held_out = base["full"]["queries"]
    lines = [
        "### BBC headline → article (held-out split)",
        "",
        f"`bench/quality.py{_args_text(args)}`, {datetime.date.today().isoformat()}. "
        f"{platform.machine()}, {os.cpu_count()} cores ({results['threads']} torch threads), shared with other jobs; "
        f"whole run {results['total_s'] / 60:.1f} min.",
        "",
        f"**Task.** {held_out} held-out headlines, each to find its own article among the {base['full']['rows']} "
        f"held-out article bodies (the headline is not in the searched text). Split: 2,225 files, "
        f"{results['split']['train_pool'] + results['split']['held_out']:,} distinct stories, "
        f"{results['split']['held_out']} held out by a salted hash, the rest the training pool "
        "(project/demo/evaluation.py). Everything runs through the ORM (`semantic.evaluation.evaluate`), "
        "bodies embedded by the worker code truncated to MiniLM's 256 tokens; ms per query is the search "
        "with the query vector already computed.",
        "",
        f"**Training.** Bi-encoder: all-MiniLM-L6-v2 + MultipleNegativesRankingLoss on {bi['pairs']:,} "
        f"(headline, body) pairs of the training pool, {bi['epochs']} epoch, batch {bi['batch_size']}, "
        f"learning rate {bi['learning_rate']:g}, {bi['max_length']} tokens per text: "
        f"**{_minutes(bi['seconds'])}**. Cross-encoder: from all-MiniLM-L6-v2's weights with a new one-output "
        f"head, {ce['loss']} on {ce['pairs']:,} training-pool headlines with their body "
        f"(label 1) and {ce['negatives_per_query']} negatives each mined by MiniLM (label 0), "
        f"{ce['examples']:,} (headline, body) pairs, {ce['batch_size']} per step, learning rate "
        f"{ce['learning_rate']:g}, {ce['max_length']} tokens per pair: **{_minutes(ce['seconds'])}** "
        + (f"({_minutes(results['reranker_with_mining_s'])} with loading and mining)." if "reranker_with_mining_s" in results else "")
        + " Both on the CPU, SentenceTransformerTrainer / CrossEncoderTrainer.",
        "",
        f"Fine-tuning moves MRR@10 of the exact vector search from "
        f"{base['full']['modes']['exact']['mrr@10']:.3f} to {tuned['full']['modes']['exact']['mrr@10']:.3f} "
        f"({gain:+.3f}).",
        "",
        f"All {held_out} held-out queries:",
        "",
        format_table(rows, metrics, label="search"),
        "",
        f"Reranking, on the first {base['subset']['queries']} held-out queries (the cross-encoder reads "
        f"{args.candidates} (headline, body) pairs per query, {args.reranker_max_length} tokens each):",
        "",
        format_table(subset_rows, base["subset"]["metrics"], label="search"),
        "",
        f"Embedding the {base['full']['rows']} bodies: {base['embedded_s']:.0f} s with MiniLM "
        f"(vectors may come from the embedding cache of an earlier run), {tuned['embedded_s']:.0f} s with the "
        f"fine-tuned model (a new fingerprint: {results['fingerprint_default']} → {results['fingerprint_' + TUNED_ALIAS]}, "
        "so nothing cached applies).",
    ]
    return "\n".join(lines)


def _minutes(seconds):
    minutes, rest = divmod(float(seconds), 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.0f} s"


def _args_text(args):
    defaults = {
        "train_pairs": 1000, "epochs": 1, "batch_size": 32, "learning_rate": 5e-5, "max_seq_length": 128,
        "reranker_pairs": 300, "negatives": 3, "reranker_loss": "listwise", "reranker_learning_rate": 2e-4,
        "reranker_max_length": 128, "candidates": 20, "rerank_queries": 100,
        "held_out": None, "reuse": False,
    }
    parts = []
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            flag = "--" + name.replace("_", "-")
            parts.append(flag if value is True else f"{flag} {value}")
    return (" " + " ".join(parts)) if parts else ""


if __name__ == "__main__":
    main()
