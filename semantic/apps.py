import logging

from django.apps import AppConfig, apps
from django.db import DatabaseError, connections
from django.db.models.signals import post_migrate, pre_migrate

logger = logging.getLogger("semantic")


class SemanticConfig(AppConfig):
    name = "semantic"
    verbose_name = "Semantic search"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from semantic import checks, signals  # noqa: F401  (registers the system checks)
        from semantic.fields import embedding_fields
        from semantic.triggers import install_triggers

        for model in apps.get_models():
            if embedding_fields(model):
                signals.connect(model)
        pre_migrate.connect(create_vector_extension, sender=self)
        # After every app's migrations: the triggers' tables are other apps'.
        post_migrate.connect(install_triggers, sender=self, dispatch_uid="semantic:install_triggers")


def create_vector_extension(using="default", **kwargs):
    """Create pgvector before any migration runs.

    ``makemigrations`` cannot know that a migration adding an EmbeddingField
    needs ``("semantic", "0001_vector_extension")`` first, so without this a
    user's migration could run before the extension exists. The migration
    stays for databases where this receiver lacks the privilege.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except DatabaseError:
        logger.warning(
            "semantic: could not create the pgvector extension before migrating; "
            "the semantic app's migration will try again",
            exc_info=True,
        )
