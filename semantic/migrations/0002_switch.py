from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("semantic", "0001_vector_extension")]

    operations = [
        migrations.CreateModel(
            name="Switch",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("field", models.CharField(max_length=255, unique=True)),
                ("alias", models.CharField(max_length=100)),
                ("dimensions", models.PositiveIntegerField()),
                ("live", models.BooleanField(default=False)),
                ("prepared_at", models.DateTimeField(auto_now_add=True)),
                ("promoted_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={"db_table": "semantic_switch"},
        ),
    ]
