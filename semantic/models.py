"""
The app's one table: the switches in progress (semantic.switching).

Everything else the app stores lives in its users' tables (an EmbeddingField
adds columns and a chunk model to the model that declares it). The module
also makes Django send the app ``pre_migrate`` and ``post_migrate``, which
it listens to: pgvector is created before migrations run, and the triggers
of sources that follow relations are installed after (semantic.apps).
"""

from django.db import models


class Switch(models.Model):
    """A change of one EmbeddingField's encoder configuration: its next slot, and which slot answers searches.

    One row per field being switched, in the database of the field's table.
    ``semantic_prepare`` creates it with the next slot's columns and tables,
    ``semantic_promote`` sets ``live`` (and ``--rollback`` clears it), and
    ``semantic_prepare --cancel`` removes it with the slot. Searches read
    ``live`` with every query while the row exists (semantic.switching).
    """

    # "app_label.Model.field", as the management commands name fields.
    field = models.CharField(max_length=255, unique=True)
    # The next configuration: an alias of SEMANTIC["MODELS"] and its vector size.
    alias = models.CharField(max_length=100)
    dimensions = models.PositiveIntegerField()
    # True while the next slot answers searches.
    live = models.BooleanField(default=False)
    prepared_at = models.DateTimeField(auto_now_add=True)
    promoted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "semantic_switch"

    def __str__(self):
        return f"{self.field} -> {self.alias} ({'live' if self.live else 'filling'})"
