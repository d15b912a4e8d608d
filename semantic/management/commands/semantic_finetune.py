"""``manage.py semantic_finetune``: fine-tune the embedding model (or train a reranker) on (query, positive) pairs."""

import json
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from semantic.conf import write_model_manifest
from semantic.evaluation import evaluate_pairs, format_table, metric_names
from semantic.training import (
    CROSS_ENCODER_LOSSES,
    TrainingError,
    TrainingOptions,
    check_output,
    bi_encoder_encode,
    cross_encoder_scorer,
    load_bi_encoder,
    load_pairs,
    resolve_base,
    split_pairs,
    train_bi_encoder,
    train_cross_encoder,
)


class Command(BaseCommand):
    help = (
        "Fine-tune the embedding model on (query, positive) pairs with MultipleNegativesRankingLoss (in-batch "
        "negatives), or with --cross-encoder train a reranker from the pairs plus mined hard negatives; write a "
        "model directory, compare before and after on held-out pairs, and print the settings that register it. "
        "Example: manage.py semantic_finetune --pairs-from project.demo.evaluation.training_pairs --alias bbc-tuned."
    )

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument(
            "--pairs",
            help="A .jsonl file of {\"query\": ..., \"positive\": ...} lines or a .csv file with columns query,positive.",
        )
        source.add_argument(
            "--pairs-from",
            help="The dotted path of a callable over the site's data returning (query, positive) tuples or such dicts.",
        )
        parser.add_argument("--alias", required=True, help="The new model alias (also names the default output directory).")
        parser.add_argument(
            "--base",
            default="default",
            help="The model to start from: an alias of SEMANTIC['MODELS'] or a model directory (default: %(default)s).",
        )
        parser.add_argument(
            "--output",
            help="Where to write the model (default: SEMANTIC['MODELS_DIR']/<alias>, where every process finds "
            "the alias by its name; ./models/<alias> without MODELS_DIR).",
        )
        parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
        parser.add_argument("--epochs", type=int, default=1, help="Passes over the training pairs (default: %(default)s).")
        parser.add_argument("--batch-size", type=int, default=None,
                            help="Pairs per step (default: 32; 16 (query, document) pairs with --cross-encoder). For the "
                            "bi-encoder, each query's negatives are the batch's other positives: larger is better, "
                            "memory allowing.")
        parser.add_argument("--learning-rate", type=float, default=None,
                            help="Peak learning rate (default: 5e-5; 2e-4 with --cross-encoder, whose head starts from nothing).")
        parser.add_argument("--max-seq-length", type=int, default=128,
                            help="Tokens per text while training (default: %(default)s; shorter is faster). The "
                            "written model keeps the base model's limit. With --cross-encoder: tokens per pair, "
                            "which the written model keeps.")
        parser.add_argument("--max-pairs", type=int, default=None, help="Train on at most this many pairs.")
        held_out = parser.add_mutually_exclusive_group()
        held_out.add_argument("--eval-split", type=float, default=0.2,
                              help="Share of the pairs held out for the before/after evaluation, the same on every "
                              "run (default: %(default)s; 0 skips the evaluation).")
        held_out.add_argument("--eval-pairs", help="Held-out pairs from a file instead (formats as --pairs).")
        held_out.add_argument("--eval-pairs-from", help="Held-out pairs from a callable instead.")
        parser.add_argument("--seed", type=int, default=0, help="Random seed (default: %(default)s).")
        parser.add_argument(
            "--prepare",
            metavar="LABEL",
            help="Then start switching this field (app_label.Model.field) to the new model, as semantic_prepare "
            "does: the workers fill its vectors beside the live ones; semantic_evaluate --compare-next checks, "
            "semantic_promote switches. The model must be where every process finds it (SEMANTIC['MODELS_DIR']).",
        )
        reranker = parser.add_argument_group("reranker (--cross-encoder)")
        reranker.add_argument("--cross-encoder", action="store_true",
                              help="Train a cross-encoder reranker instead of the embedding model (from --base's "
                              "weights with a new one-output head, or from a cross-encoder directory).")
        reranker.add_argument("--negatives", type=int, default=3,
                              help="Hard negatives mined per query (default: %(default)s).")
        reranker.add_argument("--loss", choices=sorted(CROSS_ENCODER_LOSSES), default="listwise",
                              help="listwise (default): each query's positive scored against its negatives "
                              "(ListNetLoss); binary: each pair's label learnt alone (BinaryCrossEntropyLoss), "
                              "which needs far more steps from a bi-encoder's weights.")
        reranker.add_argument("--retriever", default="default",
                              help="The embedding model (alias or directory) that mines the negatives and whose "
                              "results the reranker reorders in the evaluation (default: %(default)s).")
        reranker.add_argument("--candidates", type=int, default=20,
                              help="Results of the retriever the reranker reorders in the evaluation (default: %(default)s).")

    def handle(self, *args, **options):
        try:
            return self._handle(**options)
        except (TrainingError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc

    def _handle(self, *, alias, base, cross_encoder, verbosity, prepare=None, **options):
        from semantic.conf import semantic_settings

        _check_options(options)
        progress = verbosity >= 1
        models_dir = semantic_settings.MODELS_DIR
        output = check_output(options["output"] or Path(models_dir or "models") / alias, options["overwrite"])
        _check_alias(alias, output, cross_encoder)
        self.registers = not cross_encoder and models_dir is not None and output.parent == Path(models_dir).resolve()
        field = self._field_to_prepare(prepare, alias, cross_encoder)
        self.preparing = field is not None
        train, held_out, dropped = self._pairs(options)
        kind = "cross-encoder" if cross_encoder else "bi-encoder"
        self.stdout.write(
            f"Training a {kind} from {base!r} on {len(train):,} pairs"
            + (f" ({dropped:,} left out: their positive is held out)" if dropped else "")
            + (f", evaluating on {len(held_out):,} held-out pairs" if held_out else ", no held-out evaluation")
            + "."
        )
        if cross_encoder:
            summary = self._cross_encoder(alias, base, train, held_out, output, options, progress)
        else:
            summary = self._bi_encoder(alias, base, train, held_out, output, options, progress)
        self.stdout.write(summary)
        if field is not None:
            self._prepare(field, alias)

    def _field_to_prepare(self, label, alias, cross_encoder):
        """The field --prepare names, checked before any training (None without --prepare)."""
        if label is None:
            return None
        from semantic.conf import semantic_settings
        from semantic.management.commands._shared import resolve_one_field

        if cross_encoder:
            raise CommandError("--prepare switches an embedding field to a new embedding model: not with --cross-encoder.")
        if not self.registers and alias not in semantic_settings.MODELS:
            raise CommandError(
                "--prepare needs the model where every process finds it: set SEMANTIC['MODELS_DIR'] (and leave "
                "--output out), or add the alias to SEMANTIC['MODELS'] first."
            )
        field = resolve_one_field(label)
        from semantic import switching

        if switching.switch_state(field) is not None:
            raise CommandError(f"{label} is already being switched: promote or cancel that switch first.")
        return field

    def _prepare(self, field, alias):
        from semantic import switching
        from semantic.fields import field_label

        slot = switching.prepare(field, alias)
        name = field_label(field)
        self.stdout.write(
            f"Prepared the switch of {name} to {alias!r} ({slot.dimensions} dimensions): the workers fill it "
            f"while searches keep {field.model_alias!r}.\n"
            f"  follow:   manage.py semantic_status {name}\n"
            f"  compare:  manage.py semantic_evaluate {name} --queries FILE --compare-next\n"
            f"  promote:  manage.py semantic_promote {name}   (undo: --rollback)\n"
        )

    def _pairs(self, options):
        pairs = load_pairs(options["pairs"] or options["pairs_from"])
        extra = options["eval_pairs"] or options["eval_pairs_from"]
        if extra:
            held_out = load_pairs(extra)
            # A document evaluated on is never trained on.
            held_positives = {positive for _, positive in held_out}
            train = [pair for pair in pairs if pair[1] not in held_positives]
        else:
            train, held_out = split_pairs(pairs, options["eval_split"])
        dropped = len(pairs) - len(train) - (0 if extra else len(held_out))
        if options["max_pairs"]:
            train = train[: options["max_pairs"]]
        return train, held_out, dropped

    def _bi_encoder(self, alias, base, train, held_out, output, options, progress):
        location, config = resolve_base(base)
        rows = []
        if held_out:
            before = _evaluate_bi_encoder(load_bi_encoder(location, config), config, held_out, progress)
            rows.append((f"{base} (before)", before))
        result = train_bi_encoder(base, train, output, _training_options(options, progress, batch_size=32, learning_rate=5e-5))
        lines = [_trained_line(result, output)]
        if held_out:
            after = _evaluate_bi_encoder(result.model, config, held_out, progress)
            rows.append((f"{alias} (after)", after))
            lines += _comparison(rows, held_out, "exact cosine")
        entry = {"dimensions": result.model.get_embedding_dimension()}
        for key in ("query_prefix", "document_prefix"):
            if config.get(key):
                entry[key] = config[key]
        if self.registers:
            write_model_manifest(output, entry)
            lines += ["", f"Registered as model alias {alias!r} (SEMANTIC['MODELS_DIR']): every process finds it by that name."]
        else:
            lines += [
                "",
                'Register the alias: add to settings.SEMANTIC["MODELS"]:',
                f"    {json.dumps(alias)}: {json.dumps({'path': str(output), **entry})},",
            ]
        if not self.preparing:
            lines.append(
                f"Switch a field to it without a hole in search: manage.py semantic_prepare app_label.Model.field --model {alias} "
                "(or --prepare LABEL here), then semantic_promote."
            )
        return "\n".join(lines) + "\n"

    def _cross_encoder(self, alias, base, train, held_out, output, options, progress):
        retriever_location, retriever_config = resolve_base(options["retriever"])
        retriever = load_bi_encoder(retriever_location, retriever_config)
        training = _training_options(options, progress, batch_size=16, learning_rate=2e-4)
        result = train_cross_encoder(
            base,
            train,
            output,
            training,
            miner=retriever,
            miner_config=retriever_config,
            negatives=options["negatives"],
            loss=options["loss"],
        )
        lines = [_trained_line(result, output)]
        if held_out:
            encode = bi_encoder_encode(retriever, retriever_config, progress=progress)
            candidates = options["candidates"]
            before = evaluate_pairs(held_out, encode, progress=progress)
            after = evaluate_pairs(held_out, encode, rerank=cross_encoder_scorer(result.model), candidates=candidates, progress=progress)
            rows = [(options["retriever"], before), (f"{options['retriever']} + {alias} (top {candidates} reranked)", after)]
            lines += _comparison(rows, held_out, "exact cosine, then the reranker")
        lines += [
            "",
            "Use it as the reranker: in settings.SEMANTIC set",
            f'    "RERANKER": {json.dumps({"path": str(output), "max_length": training.max_length})},',
            "and search with semantic_search(..., rerank=True).",
        ]
        return "\n".join(lines) + "\n"


def _training_options(options, progress, batch_size, learning_rate):
    """TrainingOptions from the command's options; ``batch_size`` and ``learning_rate`` are the kind of model's defaults."""
    return TrainingOptions(
        epochs=options["epochs"],
        batch_size=options["batch_size"] or batch_size,
        learning_rate=options["learning_rate"] or learning_rate,
        max_length=options["max_seq_length"],
        seed=options["seed"],
        overwrite=options["overwrite"],
        progress=progress,
    )


def _check_options(options):
    for name in ("epochs", "batch_size", "max_seq_length", "max_pairs", "negatives", "candidates"):
        value = options.get(name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")
    if options["learning_rate"] is not None and options["learning_rate"] <= 0:
        raise CommandError(f"--learning-rate must be positive, not {options['learning_rate']}.")


def _check_alias(alias, output, cross_encoder):
    """A bi-encoder's new alias must not name another model already."""
    from semantic.conf import semantic_settings
    from semantic.encoders import model_location

    if cross_encoder or alias not in semantic_settings.MODELS:
        return
    configured = Path(model_location(semantic_settings.model_config(alias))).resolve()
    if configured != output:
        raise CommandError(
            f"Model alias {alias!r} is already configured for {configured}; choose a new --alias "
            f"(or --output {configured} --overwrite to retrain that model in place)."
        )


def _evaluate_bi_encoder(model, config, pairs, progress):
    return evaluate_pairs(pairs, bi_encoder_encode(model, config, progress=progress), progress=progress)


def _trained_line(result, output):
    minutes, seconds = divmod(result.seconds, 60)
    took = f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"
    details = result.details
    if details["kind"] == "cross-encoder":
        what = f"{details['pairs']:,} positives + {result.examples - details['pairs']:,} mined negatives"
    else:
        what = f"{details['pairs']:,} pairs"
    epochs = f"{details['epochs']} epoch" + ("s" if details["epochs"] != 1 else "")
    return (
        f"Trained in {took}: {what}, {epochs}, {result.steps} steps of {details['batch_size']} pairs, "
        f"final loss {result.loss:.4f}.\nModel written to {output}"
    )


def _comparison(rows, held_out, how):
    documents = len({positive for _, positive in held_out})
    metrics = metric_names(10)
    before, after = rows[0][1], rows[-1][1]
    return [
        "",
        f"Held-out evaluation: {len(held_out):,} queries, each to find its own positive among {documents:,} "
        f"documents ({how}).",
        format_table(rows, metrics, label="model", extra=()),
        f"MRR@10 {before['mrr@10']:.3f} -> {after['mrr@10']:.3f} ({after['mrr@10'] - before['mrr@10']:+.3f}).",
    ]
