"""``manage.py semantic_status``: where every embedding field stands."""

import json

from celery import current_app
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections
from kombu.exceptions import ChannelError

from semantic.conf import semantic_settings
from semantic.management.commands._shared import LABEL_HELP, SemanticCommand, field_label, first_line, resolve_fields
from semantic import switching
from semantic.status import FAILED, FRESH, MISSING, OUTDATED, STALE, failures, field_status

# Failed rows listed with their errors, per field.
FAILURES_SHOWN = 5

# Seconds the broker may take to connect and answer; past that the queue
# length is reported as unknown.
BROKER_TIMEOUT = 1.0

# Every index on one column of a table, with its access method (hnsw,
# ivfflat, btree...) and the operator class of that column.
INDEX_SQL = """
SELECT i.relname, am.amname, opc.opcname
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_am am ON am.oid = i.relam
CROSS JOIN LATERAL unnest(x.indkey::int2[], x.indclass::oid[]) AS k(attnum, opclass)
JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
JOIN pg_opclass opc ON opc.oid = k.opclass
WHERE x.indrelid = to_regclass(%s) AND a.attname = %s
ORDER BY i.relname
"""


def vector_indexes(field, model, using):
    """The indexes on ``model``'s column for ``field``: [{"name", "type", "opclass", "matches_metric"}].

    ``matches_metric`` says whether a search by the field's metric can use
    the index (its operator class is the metric's).
    """
    connection = connections[using]
    table = connection.ops.quote_name(model._meta.db_table)
    column = model._meta.get_field("embedding" if model is field.chunk_model else field.name).column
    with connection.cursor() as cursor:
        cursor.execute(INDEX_SQL, [table, column])
        rows = cursor.fetchall()
    return [
        {"name": name, "type": kind, "opclass": opclass, "matches_metric": opclass == field.opclass}
        for name, kind, opclass in rows
    ]


def chunk_count(field, using):
    """Rows of the field's chunk table (None for chunks=False)."""
    if field.chunk_model is None:
        return None
    return field.chunk_model._base_manager.using(using).count()


def queue_length(queue):
    """Messages waiting in ``queue`` on the Celery broker; raises when the broker cannot be asked.

    Counts what no worker has taken yet (on Redis, the list's length over
    its priority levels); tasks a worker holds unacknowledged are not counted.
    """
    transport_options = {"socket_connect_timeout": BROKER_TIMEOUT, "socket_timeout": BROKER_TIMEOUT}
    connection = current_app.connection_for_read(connect_timeout=BROKER_TIMEOUT, transport_options=transport_options)
    with connection:
        connection.ensure_connection(max_retries=0)
        try:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:
            return 0  # no such queue: Redis drops an emptied list, AMQP never declared it


def queue_status():
    """{"name", "length", "error"}: the embedding queue's length, or None and why."""
    name = semantic_settings.QUEUE
    try:
        return {"name": name, "length": queue_length(name), "error": None}
    except Exception as exc:  # any broker or transport failure
        return {"name": name, "length": None, "error": first_line(exc)}


def hit_rate(stats):
    looked_up = stats["hits"] + stats["misses"]
    return stats["hits"] / looked_up if looked_up else None


def full_status(field, using):
    """``field_status`` plus chunks, indexes, the cache hit rate and the first failed rows."""
    status = field_status(field, using)
    shown = failures(field, using, FAILURES_SHOWN) if status[FAILED] else []
    status["failures"] = [{"pk": pk, "attempts": attempts, "error": error} for pk, attempts, error in shown]
    status["chunks"] = chunk_count(field, using)
    status["chunk_table"] = field.chunk_model._meta.db_table if field.chunk_model else None
    status["metric"] = field.metric
    status["index"] = vector_indexes(field, field.model, using)
    status["chunk_index"] = vector_indexes(field, field.chunk_model, using) if field.chunk_model else None
    status["cache_hit_rate"] = hit_rate(status["cache"])
    status["switch"] = switch_status(field, using)
    return status


def switch_status(field, using):
    """The field's switch (semantic.switching): the next slot's alias, size, counts, index; None without one."""
    slot, live = switching.switch_slots(field, using)
    if slot is None:
        return None
    return {
        "alias": slot.alias,
        "dimensions": slot.dimensions,
        "live": live.is_next,
        "fingerprint": slot.fingerprint,
        "index_ready": switching.index_is_ready(slot, using),
        "chunk_table": slot.chunk_table,
        **slot.count_statuses(using),
    }


def describe_indexes(indexes, field):
    if not indexes:
        return f"none: searches scan exactly (add HnswIndex(..., opclasses=['{field.opclass}']))"
    parts = []
    for index in indexes:
        text = f"{index['name']} ({index['type']}, {index['opclass']})"
        if not index["matches_metric"]:
            text += f" -- not usable by {field.metric} searches, which need {field.opclass}"
        parts.append(text)
    return "; ".join(parts)


class Command(SemanticCommand):
    help = (
        "Show where each embedding field stands: rows by embedding status (fresh; pending for a worker: "
        "stale, missing a vector, made by another model; failed, with the first errors; no text), chunks, "
        "the encoder's fingerprint, the vector indexes, the embedding cache's hit rate, and how many "
        "tasks wait in the Celery queue. Reads counts only; loads no model."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("labels", nargs="*", metavar="label", help=f"Fields to show ({LABEL_HELP}). Default: all.")
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")

    def run(self, *, labels, database, **options):
        fields = resolve_fields(labels, database)
        statuses = {field_label(field): full_status(field, database) for field in fields}
        queue = queue_status()
        if options["json"]:
            self.stdout.write(json.dumps({"database": database, "fields": statuses, "queue": queue}, indent=2, cls=DjangoJSONEncoder))
            return
        for field in fields:
            self.write_field(field, statuses[field_label(field)])
        if queue["length"] is None:
            self.stdout.write(f"Queue {queue['name']!r}: length unknown (broker unreachable: {queue['error']})")
        else:
            self.stdout.write(f"Queue {queue['name']!r}: {queue['length']:,} task(s) waiting")

    def write_switch(self, field, switch):
        write = self.stdout.write
        share = switch[FRESH] / switch["with_text"] if switch["with_text"] else 1.0
        live = "promoted: searches use it" if switch["live"] else "filling: searches use the declared model"
        write(f"  switch       to {switch['alias']!r} ({switch['dimensions']} dimensions), {live}")
        line = (
            f"               fresh {switch[FRESH]:,} of {switch['with_text']:,} rows with text ({share:.0%}), "
            f"pending {switch['pending']:,}, failed {switch[FAILED]:,}; "
            + ("index ready" if switch["index_ready"] else "index missing or invalid: run semantic_prepare again")
        )
        write(self.style.WARNING(line) if switch["pending"] or not switch["index_ready"] else line)

    def write_field(self, field, status):
        write = self.stdout.write
        write(self.style.MIGRATE_HEADING(field_label(field)))
        write(f"  model        {status['model_alias']!r}, fingerprint {status['fingerprint']}")
        write(f"  rows         {status['rows']:,} ({status['with_text']:,} with text, {status['no_text']:,} without)")
        pending = (
            f"pending {status['pending']:,} (stale {status[STALE]:,}, missing a vector {status[MISSING]:,}, "
            f"made by another model or settings {status[OUTDATED]:,})"
        )
        write(f"  fresh        {status[FRESH]:,}    {self.style.WARNING(pending) if status['pending'] else pending}")
        if status[FAILED]:
            write(
                self.style.ERROR(f"  failed       {status[FAILED]:,}")
                + f" (set aside after {semantic_settings.MAX_ATTEMPTS} attempts; semantic_reindex --failed retries them)"
            )
            for failure in status["failures"]:
                write(f"               pk {failure['pk']}: {failure['error']}")
        else:
            write("  failed       0")
        if status["chunks"] is not None:
            write(f"  chunks       {status['chunks']:,} in {status['chunk_table']}")
        write(f"  index        {describe_indexes(status['index'], field)}")
        if status["chunk_index"] is not None:
            write(f"  chunk index  {describe_indexes(status['chunk_index'], field)}")
        if status["switch"] is not None:
            self.write_switch(field, status["switch"])
        cache = status["cache"]
        rate = status["cache_hit_rate"]
        rate_text = "no lookups yet" if rate is None else f"{rate:.1%} hit rate"
        write(
            f"  cache        {rate_text} ({cache['hits']:,} hits, {cache['misses']:,} misses; "
            f"{cache['texts_encoded']:,} texts encoded in {cache['encode_calls']:,} calls)"
        )
        write("")
