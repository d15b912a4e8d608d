"""``manage.py semantic_evaluate``: retrieval quality of each search mode on labelled queries."""

import json

from django.core.management.base import CommandError

from semantic import switching
from semantic.evaluation import MODE_HELP, MODES, evaluate, format_table, import_callable
from semantic.fields import get_embedding_field
from semantic.management.commands._shared import LABEL_HELP, SemanticCommand, field_label, resolve_label
from semantic.slots import Slot


class Command(SemanticCommand):
    help = (
        "Measure search quality on labelled queries: recall@1, recall@k, MRR@10 and NDCG@10 and the time per "
        "query of each search mode (exact and index vector search, hybrid, reranked) and of a plain PostgreSQL "
        "full-text baseline. Example: manage.py semantic_evaluate demo.Article --queries queries.jsonl. "
        "The shipped BBC evaluation: manage.py semantic_evaluate --suite project.demo.evaluation.bbc_suite."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("label", nargs="?", help=f"What to search: {LABEL_HELP}. Not with --suite.")
        parser.add_argument(
            "--queries",
            help="Labelled queries: a .jsonl file of {\"query\": ..., \"relevant\": [ids]} lines, a .csv file with "
            "columns query,relevant (ids separated by |), or the dotted path of a callable returning such records.",
        )
        parser.add_argument(
            "--suite",
            help="Instead of a label and --queries: the dotted path of an evaluation suite, a callable taking "
            "using=, progress= and (with --model) alias=, and returning a context manager that yields an object "
            "with queryset, queries, field, id_field and optionally text_fields (e.g. project.demo.evaluation.bbc_suite).",
        )
        parser.add_argument("--model", help="With --suite: the model alias the suite embeds with (default: the suite's).")
        parser.add_argument(
            "--modes",
            help=f"Comma-separated modes to run (default: every mode available). {'; '.join(f'{m}: {h}' for m, h in MODE_HELP.items())}.",
        )
        parser.add_argument("--k", type=int, default=10, help="Depth of recall@k (default: %(default)s); MRR and NDCG are at 10.")
        parser.add_argument("--id-field", default=None, help="The column the labels' ids name (default: the primary key).")
        parser.add_argument("--reranker", help="A CrossEncoder directory for the rerank mode instead of SEMANTIC['RERANKER'].")
        parser.add_argument("--candidates", type=int, default=None, help="Rows the reranker reads per query (default: RERANK_CANDIDATES).")
        parser.add_argument(
            "--text-fields",
            help="Comma-separated columns for the full-text and hybrid modes (default: the field's source columns).",
        )
        parser.add_argument(
            "--compare-next",
            action="store_true",
            help="With a label whose field is being switched (semantic_prepare): evaluate its declared and its next "
            "slot, each searched with its own model, in one table.",
        )
        parser.add_argument("--json", action="store_true", dest="as_json", help="Print the results as JSON instead of a table.")

    def run(self, *args, label=None, queries=None, suite=None, model=None, modes=None, k=10, id_field=None,
            reranker=None, candidates=None, text_fields=None, as_json=False, database="default", verbosity=1,
            compare_next=False, **options):
        if suite and (label or queries):
            raise CommandError("Give either --suite or a label with --queries, not both.")
        if not suite and not (label and queries):
            raise CommandError("Give a label and --queries (e.g. demo.Article --queries queries.jsonl), or --suite.")
        if model and not suite:
            raise CommandError("--model only applies to --suite (a label's field already names its model alias).")
        if compare_next and suite:
            raise CommandError("--compare-next compares the slots of a field: give its label and --queries, not --suite.")
        if k < 1:
            raise CommandError(f"--k must be at least 1, not {k}.")
        if candidates is not None and candidates < 1:
            raise CommandError(f"--candidates must be at least 1, not {candidates}.")
        common = {
            "modes": _parse_modes(modes),
            "k": k,
            "reranker": reranker,
            "candidates": candidates,
            "text_fields": [name.strip() for name in text_fields.split(",") if name.strip()] if text_fields else None,
            "progress": verbosity >= 1 and not as_json,
        }
        if suite:
            with self._suite(suite, model, database, common["progress"]) as loaded:
                common["text_fields"] = common["text_fields"] or getattr(loaded, "text_fields", None)
                result = _evaluate(loaded.queryset, loaded.queries, field=loaded.field, id_field=id_field or loaded.id_field, **common)
            result["title"] = getattr(loaded, "description", "") or suite
        else:
            model_class, embedding_field = resolve_label(label)
            queryset = model_class._default_manager.using(database).all()
            if not hasattr(queryset, "semantic_search"):
                raise CommandError(f"{model_class._meta.label}'s default manager is not a SemanticManager.")
            field = embedding_field or get_embedding_field(model_class)
            if compare_next:
                upcoming = switching.next_slot(field, database)
                if upcoming is None:
                    raise CommandError(f"{field_label(field)} has no switch to compare: semantic_prepare {field_label(field)} --model ALIAS first.")
                slots = [Slot(field), upcoming]
                results = [_evaluate(queryset, queries, field=field.name, id_field=id_field or "pk", slot=slot, **common) for slot in slots]
                result = side_by_side(results)
            else:
                result = _evaluate(queryset, queries, field=field.name, id_field=id_field or "pk", **common)
            result["title"] = f"{field_label(field)}, queries from {queries}"
        self.stdout.write(json.dumps(result, indent=2, sort_keys=True) if as_json else render(result))

    def _suite(self, suite, alias, database, progress):
        try:
            factory = import_callable(suite)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if not callable(factory):
            raise CommandError(f"{suite!r} is not callable.")
        kwargs = {"using": database, "progress": progress}
        if alias:
            kwargs["alias"] = alias
        return factory(**kwargs)


def _parse_modes(text):
    if not text:
        return None
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise CommandError(f"Unknown mode(s) in --modes: {', '.join(unknown) or text!r}. Modes: {', '.join(MODES)}.")
    return modes


def _evaluate(queryset, queries, **options):
    try:
        return evaluate(queryset, queries, **options)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def side_by_side(results):
    """One result of evaluate() results of a field's slots: each mode's row per slot, named ``mode [alias]``."""
    combined = {key: results[0][key] for key in ("k", "queries", "metrics", "skipped")}
    combined["slots"] = [
        {**result["slot"], "rows": result["rows"], "unreachable": result["unreachable"], "embed_queries_seconds": result["embed_queries_seconds"]}
        for result in results
    ]
    combined["modes"] = {
        f"{mode} [{result['slot']['alias']}]": result["modes"][mode] for mode in results[0]["modes"] for result in results
    }
    return combined


def render(result):
    """The human-readable report of an evaluate() result (or of side_by_side's)."""
    if "slots" in result:
        counts = [
            f"{'next' if slot['next'] else 'declared'} {slot['alias']!r} ({slot['dimensions']} dimensions): "
            f"{slot['rows']} rows with a current vector, {slot['unreachable']} queries with no relevant row among them"
            for slot in result["slots"]
        ]
        summary = f"{result['queries']} queries; " + "; ".join(counts) + "."
    else:
        summary = (
            f"{result['queries']} queries over {result['rows']} rows with a current vector; "
            f"{result['unreachable']} queries have no relevant row among them."
        )
    lines = [
        result.get("title", ""),
        summary,
        "",
        format_table(list(result["modes"].items()), result["metrics"]),
    ]
    for mode, reason in result["skipped"].items():
        lines.append(f"skipped {mode}: {reason}")
    return "\n".join(lines) + "\n"
