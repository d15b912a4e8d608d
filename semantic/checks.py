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
    batch_size = semantic_settings.BATCH_SIZE
    sizes = list(batch_size.values()) if isinstance(batch_size, dict) else [batch_size]
    for name in ("CLAIM_SIZE",):
        sizes.append(getattr(semantic_settings, name))
    if not all(isinstance(size, int) and size >= 1 for size in sizes):
        errors.append(
            checks.Error(
                "SEMANTIC['BATCH_SIZE'] (an int or a dict by device type) and SEMANTIC['CLAIM_SIZE'] "
                f"must be positive integers, not {batch_size!r} / {semantic_settings.CLAIM_SIZE!r}.",
                id="semantic.E010",
            )
        )
    return errors
