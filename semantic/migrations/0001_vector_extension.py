from django.db import migrations
from pgvector.django import VectorExtension


class Migration(migrations.Migration):
    """Creates the pgvector extension.

    Migrations that add an EmbeddingField depend on this one:
    ``dependencies = [("semantic", "0001_vector_extension"), ...]``.
    """

    dependencies = []
    operations = [VectorExtension()]
