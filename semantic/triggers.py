"""
Database triggers that mark rows stale when a table their text depends on changes.

Installed after every ``migrate`` (a post_migrate receiver, idempotent):
for each table a text depends on (semantic.relations.watches), one
statement-level trigger per event marks exactly the rows that reach a
changed object stale (status's stale mark), in the same statement as the
change, whatever made it: ``save()``, ``QuerySet.update()``,
``bulk_update()``, the SET NULL of a deletion, ``m2m`` adds and removes,
raw SQL. One ``UPDATE … WHERE pk IN (…)`` per statement, so an author
edit reaching 10,000 articles is one UPDATE, not 10,000 saves. Which rows
reach which objects is the ORM's own query (``Article.objects.filter(
author__publisher__pk__in=…)``), compiled once into the trigger.

What a trigger watches, for a path of hops 1..n ending in an attribute:

* the attribute's column on the last model (UPDATE, when its value changes);
* each hop's link: a foreign key column on the hop's source model (UPDATE
  of that column), a reverse foreign key's column on the target model
  (INSERT, DELETE, UPDATE of it), a many-to-many's through table (INSERT,
  DELETE, UPDATE).

A deletion is one of these: Django's SET NULL updates a foreign key,
a cascade deletes rows or through rows. The triggers' own UPDATE writes
only the field's hidden columns, which no trigger watches, so they never
fire each other. Django signals on the same models only wake a worker
(semantic.signals); a change without signals (``QuerySet.update()`` on a
related model, raw SQL) is embedded when the periodic sweep for lost
wake-ups runs.
"""

import hashlib
import logging
import re
from dataclasses import dataclass

from django.db import connections, transaction
from django.db.models.expressions import RawSQL

from semantic.hashing import STALE_PREFIX
from semantic.relations import watches
from semantic.status import embedding_fields_on

logger = logging.getLogger("semantic")

# Names of the functions and triggers this module owns (<= 63 bytes in all).
TRIGGER_PREFIX = "semantic_dep_"
# A fresh stale mark per row, as semantic.hashing.new_stale_mark makes in Python.
STALE_MARK_SQL = f"'{STALE_PREFIX}' || replace(gen_random_uuid()::text, '-', '')"
# Transition tables' names inside the trigger functions.
OLD_ROWS, NEW_ROWS = "semantic_old", "semantic_new"


@dataclass(frozen=True)
class Trigger:
    """One function and its per-event triggers on one table; ``name`` is a digest of their SQL."""

    name: str
    table: str
    statements: tuple

    @property
    def trigger_names(self):
        """The names of the function's triggers (one per event)."""
        return frozenset(re.findall(r'CREATE TRIGGER "([^"]+)"', " ".join(self.statements)))


def triggers(field, connection):
    """The Trigger of each of ``field``'s watches, its SQL built for ``connection``."""
    made = []
    for watch in watches(field):
        if watch.model._meta.db_table == field.model._meta.db_table and watch.lookup == f"{field.model._meta.pk.name}__in":
            statements = _own_row_trigger(field, watch, connection)
        else:
            statements = _statement_trigger(field, watch, connection)
        # Named by its SQL: a changed definition is a new trigger, the old one dropped.
        digest = hashlib.sha256("\n".join(statements).encode()).hexdigest()[:24]
        name = f"{TRIGGER_PREFIX}{digest}"
        made.append(Trigger(name, watch.table, tuple(statement.replace(NAME, name) for statement in statements)))
    return made


# Stands for the trigger's name in its statements until their digest names it.
NAME = "__semantic_trigger_name__"


def _hidden_columns(field, connection):
    qn = connection.ops.quote_name
    column = {name: qn(field.model._meta.get_field(name).column) for name in field.hidden_column_names}
    # What status.stale_mark writes: a new mark, and no failure on record.
    return {
        column[field.source_hash_attname]: STALE_MARK_SQL,
        column[field.failed_hash_attname]: "NULL",
        column[field.attempts_attname]: "0",
        column[field.error_attname]: "NULL",
    }


def _own_row_trigger(field, watch, connection):
    """The row's own foreign key changed: the mark goes into the row being written (BEFORE, per row).

    Cheaper than a statement trigger on the owner's table, which every
    write of the worker would fire, and it cannot fire itself.
    """
    qn = connection.ops.quote_name
    sets = " ".join(f"NEW.{column} := {value};" for column, value in _hidden_columns(field, connection).items())
    changed = " OR ".join(f"OLD.{qn(column)} IS DISTINCT FROM NEW.{qn(column)}" for column in watch.columns)
    of = ", ".join(qn(column) for column in watch.columns)
    return [
        f"CREATE OR REPLACE FUNCTION {qn(NAME)}() RETURNS trigger LANGUAGE plpgsql AS $semantic$\n"
        f"BEGIN\n  {sets}\n  RETURN NEW;\nEND\n$semantic$",
        f"CREATE TRIGGER {qn(NAME + '_r')} BEFORE UPDATE OF {of} ON {qn(watch.table)}"
        f" FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION {qn(NAME)}()",
    ]


def _statement_trigger(field, watch, connection):
    """Another table changed: one UPDATE of the rows reaching the changed objects, per statement.

    PostgreSQL takes no column list on a trigger with transition tables, so
    an UPDATE trigger fires for every UPDATE of its table and compares the
    watched columns itself; it writes only when some changed (which also
    stops a trigger on the owner's own table from firing itself forever).
    """
    qn = connection.ops.quote_name
    owner = field.model
    mark = ", ".join(f"{column} = {value}" for column, value in _hidden_columns(field, connection).items())
    key, table_pk = qn(watch.key), qn(watch.model._meta.pk.column)
    changed = " OR ".join(f"n.{qn(column)} IS DISTINCT FROM o.{qn(column)}" for column in watch.columns)
    joined = f"{NEW_ROWS} AS n JOIN {OLD_ROWS} AS o ON o.{table_pk} = n.{table_pk} WHERE {changed}"
    keys = {
        "INSERT": f"SELECT {key} FROM {NEW_ROWS}",
        "DELETE": f"SELECT {key} FROM {OLD_ROWS}",
        "UPDATE": f"SELECT n.{key} FROM {joined} UNION SELECT o.{key} FROM {joined}",
    }
    branches = []
    for event in watch.events:
        dependents = owner._base_manager.filter(**{watch.lookup: RawSQL(keys[event], ())}).values("pk")
        sql, params = dependents.query.get_compiler(connection=connection).as_sql()
        if params:  # nothing here takes a parameter; a change in Django would show here first
            raise ValueError(f"semantic: unexpected parameters in a trigger's query: {params!r}")
        update = f"UPDATE {qn(owner._meta.db_table)} SET {mark} WHERE {qn(owner._meta.pk.column)} IN ({sql});"
        if event == "UPDATE":
            update = f"IF EXISTS (SELECT 1 FROM {joined}) THEN {update} END IF;"
        branches.append(f"IF TG_OP = '{event}' THEN {update} END IF;")
    body = "\n  ".join(branches)
    statements = [
        f"CREATE OR REPLACE FUNCTION {qn(NAME)}() RETURNS trigger LANGUAGE plpgsql AS $semantic$\n"
        f"BEGIN\n  {body}\n  RETURN NULL;\nEND\n$semantic$"
    ]
    for event in watch.events:
        transition = {
            "INSERT": f"NEW TABLE AS {NEW_ROWS}",
            "DELETE": f"OLD TABLE AS {OLD_ROWS}",
            "UPDATE": f"OLD TABLE AS {OLD_ROWS} NEW TABLE AS {NEW_ROWS}",
        }[event]
        statements.append(
            f"CREATE TRIGGER {qn(NAME + '_' + event[0].lower())} AFTER {event} ON {qn(watch.table)}"
            f" REFERENCING {transition} FOR EACH STATEMENT EXECUTE FUNCTION {qn(NAME)}()"
        )
    return statements


def installed_triggers(connection):
    """{function name: set of its trigger names} of this module's functions in ``connection``'s database."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT p.proname, t.tgname FROM pg_proc p"
            " LEFT JOIN pg_trigger t ON t.tgfoid = p.oid AND NOT t.tgisinternal WHERE p.proname LIKE %s",
            [TRIGGER_PREFIX.replace("_", r"\_") + "%"],
        )
        present = {}
        for function, trigger in cursor.fetchall():
            present.setdefault(function, set()).update([trigger] if trigger else [])
        return present


def missing_triggers(wanted, present):
    """The Triggers of ``wanted`` not in place in ``present`` (installed_triggers): absent, or missing one of their triggers."""
    return [trigger for name, trigger in wanted.items() if present.get(name) != trigger.trigger_names]


def wanted_triggers(connection, using):
    """Every Trigger the embedding fields of database ``using`` need, by name."""
    wanted = {}
    for field in embedding_fields_on(using):
        if not field.follows_relations:
            continue
        try:
            made = triggers(field, connection)
        except ValueError:
            continue  # a path that does not resolve: semantic.E001 says which
        wanted.update((trigger.name, trigger) for trigger in made)
    return wanted


def install_triggers(using="default", **kwargs):
    """Make the database's triggers exactly those the fields need; returns (created, dropped) counts.

    A post_migrate receiver: it runs after every ``migrate`` (and test
    database flush), and changes nothing when all is in place. A trigger
    whose table does not exist yet (a partial migrate) waits for the next.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return 0, 0
    wanted = wanted_triggers(connection, using)
    present = installed_triggers(connection)
    tables = set(connection.introspection.table_names())
    qn = connection.ops.quote_name
    created = dropped = 0
    missing = missing_triggers(wanted, present)
    with transaction.atomic(using=using), connection.cursor() as cursor:
        for name in present:
            if name not in wanted or wanted[name] in missing:
                # Its triggers go with it; one missing a trigger is made again whole.
                cursor.execute(f"DROP FUNCTION IF EXISTS {qn(name)}() CASCADE")
                dropped += 1
        for trigger in missing:
            name = trigger.name
            if trigger.table not in tables:
                logger.warning("semantic: table %s does not exist yet; its trigger %s waits for the next migrate", trigger.table, name)
                continue
            for statement in trigger.statements:
                cursor.execute(statement)
            created += 1
    return created, dropped
