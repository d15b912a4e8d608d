"""
System checks that are not tied to one field (field checks live on
EmbeddingField.check). None of them loads a model.
"""

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from semantic.conf import semantic_settings


@checks.register("semantic")
def check_settings(app_configs=None, **kwargs):
    """semantic.E010: the SEMANTIC dict and every model alias in it are valid."""
    errors = []
    try:
        aliases = list(semantic_settings.MODELS)
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="See semantic/conf.py for the known keys.", id="semantic.E010")]
    for alias in aliases:
        try:
            semantic_settings.model_config(alias)
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), id="semantic.E010"))
    if not isinstance(semantic_settings.BATCH_SIZE, int) or semantic_settings.BATCH_SIZE < 1:
        errors.append(
            checks.Error(
                f"SEMANTIC['BATCH_SIZE'] must be a positive integer, not {semantic_settings.BATCH_SIZE!r}.",
                id="semantic.E010",
            )
        )
    return errors
