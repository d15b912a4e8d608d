"""
Fine-tuning on a site's own (query, positive) pairs.

* ``train_bi_encoder``: the embedding model, with MultipleNegativesRankingLoss
  (every other positive in a batch is a negative for a query), through
  sentence-transformers' ``SentenceTransformerTrainer``.
* ``train_cross_encoder``: a reranker, with binary relevance: the pairs are
  positives and hard negatives are mined with a bi-encoder
  (``mine_hard_negatives``: the documents it ranks highest for a query that
  are not its positive); a listwise loss (ListNetLoss) or
  BinaryCrossEntropyLoss, through ``CrossEncoderTrainer``. It can start from
  a bi-encoder's weights (a new one-output head is added), so a site without
  a downloadable reranker can make its own.

Both write a complete model directory: into a staging folder first, then
renamed into place, so a half-written model never stands at the output
path. A new directory has new files, hence a new model identity and a new
fingerprint (semantic.hashing.model_identity): pointing an alias at it makes
every row of the fields using that alias stale, and the worker or
``semantic_reindex`` re-embeds them; searches leave the old vectors out
meanwhile.

Training needs the ``datasets`` and ``accelerate`` packages (the trainers'
own requirements).
"""

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from semantic.evaluation import read_records, resolve_source

#: Salt of the deterministic held-out split of pairs.
SPLIT_SALT = "semantic-finetune-split-v1"
#: File written into a trained model's directory: what it was trained from and how.
TRAINING_FILE = "semantic_training.json"


class TrainingError(Exception):
    """Bad training input or options: the message is one line for the operator."""


# --- pairs ---------------------------------------------------------------------------


def load_pairs(source):
    """(query, positive) text pairs, as a list of tuples.

    ``source``: a ``.jsonl`` file of ``{"query": ..., "positive": ...}``
    lines (``anchor``/``text`` are accepted too), a ``.csv`` file with the
    columns ``query,positive``, a callable (or its dotted path) returning such
    dicts or ``(query, positive)`` tuples, or the records themselves. Pairs
    with an empty side are an error; exact duplicates are kept once.
    """
    try:
        records = resolve_source(source)
        if isinstance(records, Path):
            records = read_records(records)
        pairs = []
        for number, record in enumerate(records, start=1):
            if isinstance(record, dict):
                query = record.get("query", record.get("anchor"))
                positive = record.get("positive", record.get("text"))
                if query is None or positive is None:
                    raise TrainingError(f"Pair {number} needs the keys 'query' and 'positive', not {sorted(record)}.")
            else:
                try:
                    query, positive = record
                except (TypeError, ValueError):
                    raise TrainingError(f"Pair {number} is neither a dict nor a (query, positive) pair.") from None
            query, positive = str(query).strip(), str(positive).strip()
            if not query or not positive:
                raise TrainingError(f"Pair {number} has an empty query or positive.")
            pairs.append((query, positive))
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    return list(dict.fromkeys(pairs))


def split_pairs(pairs, fraction, salt=SPLIT_SALT):
    """``(train, held_out)``: about ``fraction`` of the pairs held out, the same ones on every run.

    A pair is held out by a salted hash of its positive, so the split does
    not depend on the order of the pairs, and pairs sharing a positive fall
    on the same side (a held-out document was never trained on).
    """
    if not 0 <= fraction < 1:
        raise TrainingError(f"The held-out fraction must be in [0, 1), not {fraction}.")
    train, held_out = [], []
    for pair in pairs:
        digest = hashlib.sha256(f"{salt}\0{pair[1]}".encode("utf-8", "surrogatepass")).digest()
        (held_out if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(pair)
    return train, held_out


# --- models --------------------------------------------------------------------------


def resolve_base(base):
    """``(location, config)`` of a base model: an alias of SEMANTIC["MODELS"] or a model directory.

    ``config`` holds the alias's prefixes and normalisation (defaults for a
    directory), which training and evaluation apply as searches do.
    """
    from django.core.exceptions import ImproperlyConfigured

    from semantic.conf import MODEL_DEFAULTS, semantic_settings
    from semantic.encoders import model_location

    if Path(str(base)).is_dir():
        return str(Path(base).resolve()), dict(MODEL_DEFAULTS, path=str(base))
    try:
        config = semantic_settings.model_config(base)
    except ImproperlyConfigured as exc:
        raise TrainingError(f"{base!r} is neither a model directory nor a model alias. {exc}") from None
    return model_location(config), config


def load_bi_encoder(location, config=None):
    """A SentenceTransformer on the CPU or the configured device, quietly."""
    from sentence_transformers import SentenceTransformer

    _quiet()
    model = SentenceTransformer(str(location), device=_device())
    if config and config.get("max_seq_length"):
        model.max_seq_length = config["max_seq_length"]
    return model


def bi_encoder_encode(model, config, batch_size=32, progress=False):
    """An ``encode(texts, query)`` function for evaluation.evaluate_pairs, with the alias's prefixes.

    ``progress`` shows a bar while documents are encoded (queries are quick).
    """

    def encode(texts, query):
        prefix = config.get("query_prefix" if query else "document_prefix") or ""
        return model.encode(
            [prefix + text for text in texts],
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress and not query,
        )

    return encode


def cross_encoder_scorer(model, batch_size=32):
    """A ``rerank(query, texts)`` function for evaluation.evaluate_pairs."""

    def rerank(query, texts):
        if not texts:
            return []
        return list(model.predict([(query, text) for text in texts], batch_size=batch_size, show_progress_bar=False))

    return rerank


@dataclass
class TrainingOptions:
    """How to train: the same knobs for both kinds of model.

    ``max_length`` is tokens per text for a bi-encoder, during training only
    (a shorter window trains faster; the written model keeps the base
    model's own limit), and tokens per (query, document) pair for a
    cross-encoder, which the written model keeps. ``warmup`` is the share of
    steps with a rising learning rate. ``overwrite`` replaces an existing
    output directory; ``progress`` draws a tqdm bar on stderr.
    """

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 128
    warmup: float = 0.1
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


@dataclass
class TrainingResult:
    model: object
    output: Path
    seconds: float
    steps: int
    examples: int
    loss: float = None
    details: dict = field(default_factory=dict)


def train_bi_encoder(base, pairs, output, options=None):
    """Fine-tune the bi-encoder ``base`` on ``pairs`` with MultipleNegativesRankingLoss; write it to ``output``.

    Batches never hold the same text twice (a duplicate would be its own
    in-batch negative). The alias's query and document prefixes are applied
    to the pairs. Returns a TrainingResult with the trained model.
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    options = options or TrainingOptions()
    output = check_output(output, options.overwrite)
    pairs = _check_pairs(pairs)
    location, config = resolve_base(base)
    model = _no_widget_examples(load_bi_encoder(location))
    served_length = config.get("max_seq_length") or model.max_seq_length
    model.max_seq_length = options.max_length or served_length
    query_prefix, document_prefix = config.get("query_prefix") or "", config.get("document_prefix") or ""
    dataset = Dataset.from_dict(
        {
            "anchor": [query_prefix + query for query, _ in pairs],
            "positive": [document_prefix + positive for _, positive in pairs],
        }
    )
    with tempfile.TemporaryDirectory(prefix="semantic-train-") as scratch:
        args = SentenceTransformerTrainingArguments(batch_sampler="no_duplicates", **_training_arguments(scratch, options))
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
        )
        result = _train(trainer, options, "Fine-tuning bi-encoder", len(pairs))
    model.max_seq_length = served_length
    result.details.update(kind="bi-encoder", loss="MultipleNegativesRankingLoss", base=str(base), pairs=len(pairs))
    return _save(result, output, lambda path: model.save(str(path)))


#: Losses for train_cross_encoder: name -> (sentence-transformers loss, the mined examples' format).
CROSS_ENCODER_LOSSES = {
    # Softmax over each query's positive and its negatives (ListNet with
    # binary labels): the loss falls only as the positive outscores them.
    "listwise": ("ListNetLoss", "labeled-list"),
    # Each (query, document) pair on its own, label 1 or 0.
    "binary": ("BinaryCrossEntropyLoss", "labeled-pair"),
}


def train_cross_encoder(base, pairs, output, options=None, *, miner=None, miner_config=None, negatives=3, loss="listwise"):
    """Train a one-output CrossEncoder reranker from ``base``; write it to ``output``.

    Each pair is a positive (label 1); ``negatives`` hard negatives per query
    (label 0) are mined with the bi-encoder ``miner`` (a model, a directory
    or an alias; default ``base``; ``miner_config`` gives a model's
    prefixes) among all the pairs' positives: the highest-ranked documents
    that are not the query's positive (see mine_negatives). ``base`` may
    be a bi-encoder (its transformer weights are used, with a new head) or a
    cross-encoder.

    ``loss`` (CROSS_ENCODER_LOSSES): "listwise" (default) scores each query's
    positive against its negatives; "binary" learns each pair's label alone.
    From MiniLM's weights and a few hundred steps, "binary" learned only the
    share of positives (the same score for every pair, docs/quality.md): a
    bi-encoder's [CLS] state, which the new head reads, was never trained,
    and the head's bias alone brings the binary loss down to that share,
    while a listwise loss falls only as the ranking improves.
    ``options.batch_size`` counts (query, document) pairs per step either way.
    Returns a TrainingResult with the trained model.
    """
    from datasets import Dataset
    from sentence_transformers import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder import losses

    options = options or TrainingOptions(batch_size=16)
    output = check_output(output, options.overwrite)
    pairs = _check_pairs(pairs)
    if negatives < 1:
        raise TrainingError("A cross-encoder needs at least one negative per query (--negatives).")
    if loss not in CROSS_ENCODER_LOSSES:
        raise TrainingError(f"Unknown cross-encoder loss {loss!r}; choose {' or '.join(CROSS_ENCODER_LOSSES)}.")
    loss_name, output_format = CROSS_ENCODER_LOSSES[loss]
    location, _ = resolve_base(base)
    examples = mine_negatives(
        pairs,
        miner if miner is not None else base,
        negatives,
        config=miner_config,
        max_length=options.max_length,
        output_format=output_format,
    )
    scored = sum(len(documents) for documents in examples["document"]) if loss == "listwise" else len(examples["label"])
    per_step = options
    if loss == "listwise":
        # A step's batch is of queries, each with its whole list.
        per_step = replace(options, batch_size=max(1, options.batch_size // (1 + negatives)))
    _quiet()
    model = _no_widget_examples(CrossEncoder(location, num_labels=1, max_length=options.max_length, device=_device()))
    with tempfile.TemporaryDirectory(prefix="semantic-train-") as scratch:
        trainer = CrossEncoderTrainer(
            model=model,
            args=CrossEncoderTrainingArguments(**_training_arguments(scratch, per_step)),
            train_dataset=Dataset.from_dict(examples),
            loss=getattr(losses, loss_name)(model),
        )
        result = _train(trainer, per_step, "Training cross-encoder", scored)
    result.details.update(
        kind="cross-encoder",
        loss=loss_name,
        base=str(base),
        pairs=len(pairs),
        negatives_per_query=negatives,
        batch_size=options.batch_size,
        queries_per_step=per_step.batch_size if loss == "listwise" else None,
    )
    return _save(result, output, lambda path: model.save_pretrained(str(path)))


def mine_negatives(pairs, miner, negatives, *, config=None, max_length=None, output_format="labeled-pair"):
    """Examples for a cross-encoder: each pair as a positive, plus mined negatives.

    For each query the ``negatives`` documents the bi-encoder ``miner`` (a
    SentenceTransformer, a directory or an alias) ranks highest among all
    positives, other than the query's own, are negatives
    (sentence-transformers' ``mine_hard_negatives``). ``config`` carries the
    miner's query and document prefixes (an alias brings its own);
    ``max_length`` caps the tokens it reads per text, as the cross-encoder
    will. ``output_format`` "labeled-pair" gives the columns ``query``,
    ``document``, ``label`` (one row per pair); "labeled-list" gives
    ``query``, ``document`` (a list) and ``labels`` (one row per query).
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    if not hasattr(miner, "encode"):
        location, config = resolve_base(miner)
        miner = load_bi_encoder(location, config)
    config = config or {}
    negatives = min(negatives, max(len({positive for _, positive in pairs}) - 1, 1))
    served_length = miner.max_seq_length
    if max_length:
        miner.max_seq_length = min(served_length, max_length)
    try:
        mined = mine_hard_negatives(
            Dataset.from_dict({"query": [q for q, _ in pairs], "document": [p for _, p in pairs]}),
            miner,
            num_negatives=negatives,
            sampling_strategy="top",
            query_prompt=config.get("query_prefix") or None,
            corpus_prompt=config.get("document_prefix") or None,
            output_format=output_format,
            batch_size=32,
            verbose=False,
        )
    finally:
        miner.max_seq_length = served_length
    return {name: list(mined[name]) for name in mined.column_names}


# --- helpers -------------------------------------------------------------------------


def check_output(output, overwrite):
    """``output`` as an absolute Path; TrainingError when it exists (without ``overwrite``) or is a file."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise TrainingError(f"{output} exists already; pass --overwrite to replace it (its model identity will change).")
    if output.exists() and not output.is_dir():
        raise TrainingError(f"{output} is a file, not a model directory.")
    return output


def _check_pairs(pairs):
    pairs = list(pairs)
    if len(pairs) < 2:
        raise TrainingError(f"Training needs at least 2 pairs; got {len(pairs)}.")
    return pairs


def _device():
    from semantic.conf import semantic_settings
    from semantic.encoders import resolve_device

    return resolve_device(semantic_settings.DEVICE)


def _quiet():
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _no_widget_examples(model):
    """Skip the model card's hub widget examples (computed when a trainer is made): a stray progress bar, of no use offline."""
    model.model_card_data.set_widget_examples = lambda dataset: None
    return model


def _training_arguments(scratch, options):
    import torch

    device = _device()
    return {
        "output_dir": scratch,
        "num_train_epochs": options.epochs,
        "per_device_train_batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "warmup_steps": options.warmup,
        "seed": options.seed,
        "data_seed": options.seed,
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "use_cpu": device == "cpu",
        "fp16": device.startswith("cuda") and torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        # _train replaces the trainer's own progress bar with one on stderr.
        "disable_tqdm": False,
    }


def _train(trainer, options, description, examples):
    """Run ``trainer`` with our progress bar; a TrainingResult without output yet."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    model = trainer.model
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_bar(description, options.progress))
    started = time.perf_counter()
    outcome = trainer.train()
    seconds = time.perf_counter() - started
    details = {
        "examples": examples,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "max_length": options.max_length,
        "seconds": round(seconds, 1),
    }
    return TrainingResult(model, None, seconds, outcome.global_step, examples, outcome.training_loss, details)


def _progress_bar(description, enabled):
    """A trainer callback drawing one tqdm bar over the training steps, on stderr."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=description, unit="step", disable=not enabled)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return ProgressBar()


def _save(result, output, save):
    """Write the model (``save(path)``) and TRAINING_FILE to a staging folder beside ``output``, then put it in place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save(staging)
        (staging / TRAINING_FILE).write_text(json.dumps(result.details, indent=2, sort_keys=True) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.output = output
    return result
