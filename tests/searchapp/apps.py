from django.apps import AppConfig


class SearchAppConfig(AppConfig):
    name = "tests.searchapp"
    label = "searchapp"
    default_auto_field = "django.db.models.BigAutoField"
