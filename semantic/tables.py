"""
Table settings that migrations carry, declared in a model's Meta.constraints.

``FillFactor`` leaves room on each page of a table so that the worker's
status writes stay HOT (heap-only tuple) updates, which add no index entry:

    class Article(models.Model):
        ...
        class Meta:
            constraints = [FillFactor(50, name="article_fillfactor")]

Why it matters for a table with an EmbeddingField: marking a row stale
(``update()``, ``mark_stale()``, the admin's actions) and the worker's
confirming of an unchanged text write only hash columns, but PostgreSQL
writes a new version of the whole row. When the new version does not fit
on the row's page, every index of the table gets a new entry, including an
HNSW insert of the unchanged vector: that insert is most of the cost of a
pass that only confirms hashes, and it leaves the index full of dead
entries. A row of a short text with a 384-dimension vector is ~1.9 kB, four
to a page, so every version fits only when each page is filled to about
half. The price is a heap up to twice the size on a table that never
changes; on one whose rows are often marked, the default's dead versions
cost as much (docs/design.md, "Confirming an unchanged text"). New pages
honour the setting at once; ``VACUUM FULL`` rewrites the old ones.
"""

from django.db import models

MIN_FILLFACTOR = 10  # PostgreSQL's bounds for a table's fillfactor
MAX_FILLFACTOR = 100


class FillFactor(models.BaseConstraint):
    """``ALTER TABLE … SET (fillfactor = N)`` as a Meta entry (see the module docstring).

    ``fillfactor`` is the percentage of each heap page that inserts fill,
    an integer from 10 to 100 (100 is PostgreSQL's default). Removing the
    entry resets the table to the default.
    """

    def __init__(self, fillfactor, *, name, **kwargs):
        if isinstance(fillfactor, bool) or not isinstance(fillfactor, int) or not MIN_FILLFACTOR <= fillfactor <= MAX_FILLFACTOR:
            raise ValueError(f"FillFactor takes an integer percentage from {MIN_FILLFACTOR} to {MAX_FILLFACTOR}, not {fillfactor!r}.")
        super().__init__(name=name, **kwargs)
        self.fillfactor = fillfactor

    def _statement(self, model, schema_editor, setting):
        return f"ALTER TABLE {schema_editor.quote_name(model._meta.db_table)} {setting}"

    def constraint_sql(self, model, schema_editor):
        # CREATE TABLE has no place for it among the constraints: after the table.
        schema_editor.deferred_sql.append(self.create_sql(model, schema_editor))
        return None

    def create_sql(self, model, schema_editor):
        return self._statement(model, schema_editor, f"SET (fillfactor = {int(self.fillfactor)})")

    def remove_sql(self, model, schema_editor):
        return self._statement(model, schema_editor, "RESET (fillfactor)")

    def validate(self, model, instance, exclude=None, using=None):
        # A storage setting: there is nothing about a row to check.
        return

    def deconstruct(self):
        path, args, kwargs = super().deconstruct()
        return path, (self.fillfactor, *args), kwargs

    def __eq__(self, other):
        if type(other) is type(self):
            return self.name == other.name and self.fillfactor == other.fillfactor
        return super().__eq__(other)

    def __repr__(self):
        return f"<{type(self).__name__}: fillfactor={self.fillfactor} name={self.name!r}>"
