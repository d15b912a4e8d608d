from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "project.demo"
    label = "demo"
    verbose_name = "Demo: BBC News"
    default_auto_field = "django.db.models.BigAutoField"
