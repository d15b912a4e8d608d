"""
What the semantic management commands share: naming embedding fields on the
command line, and turning the errors an operator can cause (a typo in a
label, a database that is down, a misconfigured model) into one line on
stderr and a non-zero exit instead of a traceback.
"""

from django.apps import apps
from django.core.exceptions import FieldError, ImproperlyConfigured, ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, connections
from django.utils.connection import ConnectionDoesNotExist

from semantic.fields import embedding_fields, field_label, get_embedding_field
from semantic.status import embedding_fields_on

LABEL_HELP = "app_label.Model or app_label.Model.field, e.g. demo.Article or demo.Article.embedding"
ONE_FIELD_HELP = "The field: app_label.Model.field (app_label.Model when it has one EmbeddingField)."

__all__ = [
    "LABEL_HELP",
    "ONE_FIELD_HELP",
    "SemanticCommand",
    "field_label",
    "first_line",
    "resolve_fields",
    "resolve_label",
    "resolve_one_field",
    "switch_errors",
]


def resolve_label(label):
    """``(model, field)`` for 'app_label.Model' (field None) or 'app_label.Model.field'."""
    parts = label.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise CommandError(f"{label!r} is not a model label: write {LABEL_HELP}.")
    try:
        model = apps.get_model(parts[0], parts[1])
    except LookupError as exc:
        raise CommandError(f"Unknown model {parts[0]}.{parts[1]}: {exc}") from exc
    if len(parts) == 2:
        if not embedding_fields(model):
            raise CommandError(f"{model._meta.label} has no EmbeddingField.")
        return model, None
    try:
        return model, get_embedding_field(model, parts[2])
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc


def resolve_one_field(label):
    """The EmbeddingField 'app_label.Model.field' names ('app_label.Model' when the model has one)."""
    model, field = resolve_label(label)
    if field is not None:
        return field
    try:
        return get_embedding_field(model)
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc


def switch_errors(action):
    """``action()``, a switch that cannot go on as asked (semantic.switching.SwitchError) as a CommandError."""
    from semantic.switching import SwitchError

    try:
        return action()
    except SwitchError as exc:
        raise CommandError(str(exc)) from exc


def resolve_fields(labels, using):
    """The EmbeddingFields the labels name, in order, each once; every field of ``using`` when none."""
    if not labels:
        fields = embedding_fields_on(using)
        if not fields:
            raise CommandError(f"No model in database {using!r} has an EmbeddingField.")
        return fields
    fields = []
    for label in labels:
        model, field = resolve_label(label)
        for each in [field] if field else embedding_fields(model):
            if each not in fields:
                fields.append(each)
    return fields


def first_line(exc):
    """An exception's message on one line: drivers' messages span several."""
    if isinstance(exc, ValidationError):
        return "; ".join(exc.messages)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class SemanticCommand(BaseCommand):
    """A command with ``--database`` whose expected failures end in one clear line.

    Subclasses implement ``run(**options)`` instead of ``handle``; positional
    arguments arrive as options too, under their ``dest``.
    """

    def add_arguments(self, parser):
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="The database alias to use (default: %(default)s).",
        )

    def handle(self, *args, **options):
        using = options["database"]
        try:
            connections[using]
        except ConnectionDoesNotExist as exc:
            raise CommandError(f"Unknown database alias {using!r}.") from exc
        try:
            # Fail on a database that is down before loading any model.
            connections[using].ensure_connection()
            return self.run(**options)
        except OperationalError as exc:
            raise CommandError(f"Database {using!r} is unreachable or failing: {first_line(exc)}") from exc
        except DatabaseError as exc:
            raise CommandError(f"Database error on {using!r}: {first_line(exc)} (are the migrations applied?)") from exc
        except (ImproperlyConfigured, FieldError, ValidationError) as exc:
            raise CommandError(first_line(exc)) from exc

    def run(self, **options):
        raise NotImplementedError
