"""
Finding texts edited behind the ORM (raw SQL, other programs).

Such an edit changes a row's text but not its source hash, so nothing marks
the row stale. ``rehash_rows`` reads every row's text, hashes it, and marks
the rows whose source hash no longer matches (status.stale_mark). The nightly
``semantic.sweep(rehash=True)`` runs it for every field.
"""

from semantic.status import stale_mark


def rehash_rows(field, using="default", page_size=1000):
    """Mark the rows of ``field`` whose source hash does not match their text; returns how many.

    Pages by primary key (keyset, not OFFSET), so memory stays flat and the
    cost stays linear on large tables; one UPDATE per page. A row already
    marked stale gets a new mark too: a worker may be encoding the text it
    had before the edit this pass is finding. A mark is always safe to
    write: it can only make the worker look at a row again.
    """
    manager = field.model._base_manager.using(using)
    marked = 0
    last_pk = None
    while True:
        page = manager.order_by("pk")
        if last_pk is not None:
            page = page.filter(pk__gt=last_pk)
        rows = list(field.load_for_text(page, field.source_hash_attname)[:page_size])
        if not rows:
            return marked
        changed = [row.pk for row in rows if field.compute_source_hash(row) != getattr(row, field.source_hash_attname)]
        if changed:
            marked += manager.filter(pk__in=changed).update(**stale_mark(field))
        last_pk = rows[-1].pk
