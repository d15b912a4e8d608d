"""``manage.py semantic_search``: search a model by meaning from the shell."""

import json
import shutil

from django.core.exceptions import FieldError, ValidationError
from django.core.management.base import CommandError
from django.core.serializers.json import DjangoJSONEncoder

from semantic.fields import get_embedding_field
from semantic.management.commands._shared import LABEL_HELP, SemanticCommand, field_label, first_line, resolve_label
from semantic.querysets import SemanticQuerySet

TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def parse_filter(text):
    """('filter' or 'exclude', {lookup: value}) for 'field[__lookup]=value' or 'field!=value'.

    ``__in`` takes comma-separated values; ``__isnull`` takes true or false.
    Other values are passed as strings; the field converts them.
    """
    key, sep, value = text.partition("=")
    negate = key.endswith("!")
    key = key.removesuffix("!").strip()
    if not sep or not key or " " in key:
        raise CommandError(f"Bad --filter {text!r}: write FIELD=VALUE, FIELD__LOOKUP=VALUE or FIELD!=VALUE (e.g. topic=tech).")
    if key.endswith("__in"):
        value = [part.strip() for part in value.split(",")]
    elif key.endswith("__isnull"):
        if value.lower() not in TRUE | FALSE:
            raise CommandError(f"Bad --filter {text!r}: __isnull takes true or false.")
        value = value.lower() in TRUE
    return ("exclude" if negate else "filter"), {key: value}


def apply_filters(queryset, filters):
    """``queryset`` narrowed by each --filter; a bad one is a CommandError naming it."""
    for text in filters:
        method, lookup = parse_filter(text)
        try:
            queryset = getattr(queryset, method)(**lookup)
        except (FieldError, ValidationError, ValueError, TypeError) as exc:
            raise CommandError(f"Bad --filter {text!r}: {first_line(exc)}") from exc
    return queryset


def snippet(text, width):
    """``text`` on one line, cut to ``width`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class Command(SemanticCommand):
    help = (
        "Search a model's rows by meaning and print the best matches with their scores. "
        'Example: manage.py semantic_search demo.Article "mobile phone sales" --k 5 --filter topic=tech. '
        "Rows without a vector yet are not found."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("label", help=f"What to search: {LABEL_HELP} (the field is needed only when the model has several).")
        parser.add_argument("query", help="The text to search for, in quotes.")
        parser.add_argument("--k", type=int, default=10, help="How many rows to show (default: %(default)s).")
        parser.add_argument(
            "--filter",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="Only rows that pass this ORM filter: topic=tech, published__year=2005, topic__in=tech,business, "
            "topic!=sport. Repeat for several (all must pass).",
        )
        parser.add_argument("--min-score", type=float, default=None, help="Leave out rows less similar than this score.")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--hybrid",
            action="store_true",
            help="Fuse the vector ranking with PostgreSQL full-text search (reciprocal rank fusion).",
        )
        mode.add_argument(
            "--rerank",
            action="store_true",
            help="Rescore the vector search's candidates with the cross-encoder in SEMANTIC['RERANKER'].",
        )
        parser.add_argument(
            "--exact",
            action="store_true",
            help="Compare the query with every row that passes the filters instead of using the vector index.",
        )
        parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")

    def run(self, *, label, query, database, k, min_score, exact, hybrid, rerank, **options):
        model, field = resolve_label(label)
        if k < 1:
            raise CommandError("--k must be at least 1.")
        if not query.strip():
            raise CommandError("The query is empty: give the text to search for, in quotes.")
        queryset = model._default_manager.using(database).all()
        if not isinstance(queryset, SemanticQuerySet):
            queryset = SemanticQuerySet(model, using=database)
        queryset = apply_filters(queryset, options["filter"])
        field = field or get_embedding_field(model)
        search = {"field": field.name, "k": k, "exact": True if exact else None}
        try:
            if hybrid:
                if min_score is not None:
                    search["min_score"] = min_score
                rows = list(queryset.hybrid_search(query, **search))
            else:
                rows = list(queryset.semantic_search(query, min_score=min_score, rerank=rerank, **search))
        except (ValueError, TypeError) as exc:
            # The search's own checks (a vector of the wrong size), or a
            # filter value that only fails when the query is compiled.
            raise CommandError(first_line(exc)) from exc
        mode = "hybrid" if hybrid else "rerank" if rerank else "semantic"
        results = [self.result(rank, row) for rank, row in enumerate(rows, 1)]
        if options["json"]:
            data = {"model": model._meta.label, "field": field.name, "query": query, "mode": mode, "results": results}
            self.stdout.write(json.dumps(data, indent=2, cls=DjangoJSONEncoder))
            return
        self.write_table(field, query, mode, results)

    def result(self, rank, row):
        result = {"rank": rank, "pk": row.pk}
        for name in ("score", "distance", "rerank_score", "hybrid_score", "vector_rank", "text_rank"):
            if hasattr(row, name):
                result[name] = getattr(row, name)
        result["object"] = str(row)
        chunk = getattr(row, "best_chunk", None)
        result["best_chunk"] = None if chunk is None else {"text": chunk.text, "start": chunk.start, "end": chunk.end}
        return result

    def write_table(self, field, query, mode, results):
        label = field_label(field)
        if not results:
            self.stdout.write(f"No results for {query!r} in {label} (rows without a vector yet are not searched).")
            return
        self.stdout.write(f"{len(results)} result(s) for {query!r} in {label} ({mode} search):")
        # The score the rows are ordered by first; the vector score beside it.
        score_name = {"hybrid": "hybrid_score", "rerank": "rerank_score"}.get(mode, "score")
        columns = [("rank", 4, lambda r: str(r["rank"])), (mode if mode != "semantic" else "score", 7, lambda r: _number(r.get(score_name)))]
        if mode != "semantic":
            columns.append(("vector", 7, lambda r: _number(r.get("score"))))
        if mode == "hybrid":
            columns.append(("v/t rank", 9, lambda r: f"{_rank(r['vector_rank'])}/{_rank(r['text_rank'])}"))
        pk_width = max(2, *(len(str(r["pk"])) for r in results))
        columns.append(("pk", pk_width, lambda r: str(r["pk"])))
        has_chunks = any(r["best_chunk"] for r in results)
        room = shutil.get_terminal_size((120, 24)).columns - sum(width + 2 for _, width, _ in columns)
        object_width = max(20, room // 2 if has_chunks else room)
        columns.append(("object", object_width, lambda r: snippet(r["object"], object_width)))
        if has_chunks:
            chunk_width = max(20, room - object_width - 2)
            columns.append(("best chunk", chunk_width, lambda r: snippet(r["best_chunk"]["text"], chunk_width) if r["best_chunk"] else ""))
        numeric = {"rank", "score", "hybrid", "rerank", "vector", "v/t rank", "pk"}

        def line(cells):
            return "  ".join(
                cell.rjust(width) if name in numeric else cell.ljust(width) for (name, width, _), cell in zip(columns, cells)
            ).rstrip()

        self.stdout.write(line([name for name, _, _ in columns]))
        for result in results:
            self.stdout.write(line([value(result) for _, _, value in columns]))


def _number(value):
    return "-" if value is None else f"{value:.4f}"


def _rank(value):
    return "-" if value is None else str(value)
