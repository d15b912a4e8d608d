from django.apps import AppConfig, apps


class SemanticConfig(AppConfig):
    name = "semantic"
    verbose_name = "Semantic search"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from semantic import checks, signals  # noqa: F401  (registers the system checks)
        from semantic.fields import embedding_fields

        for model in apps.get_models():
            if embedding_fields(model):
                signals.connect(model)
