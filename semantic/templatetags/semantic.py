"""
Template tags: ``{% load semantic %}``.

* ``{% similar_items article k=5 as items %}``: the rows nearest to a row,
  for a detail page's "more like this"; cached.
* ``{% snippet result query %}``: a result's passage with the query's words
  marked (safe HTML); what SemanticSearchView already put on the result
  when there is one.
"""

import logging

from django import template

from semantic import cache as embedding_cache
from semantic.conf import semantic_settings
from semantic.fields import get_embedding_field
from semantic.highlight import highlight, passage
from semantic.querysets import SemanticQuerySet
from semantic.retrieval.options import check_k
from semantic.switching import live_slot

logger = logging.getLogger("semantic")
register = template.Library()

SIMILAR_PREFIX = "semantic:similar:"


@register.simple_tag
def similar_items(obj, k=5, field=None):
    """Up to ``k`` rows of ``obj``'s model nearest to it, best first ([] while it has no vector).

    Searches the model's default manager (so a manager that hides rows
    hides them here too), by whole-row vectors. The neighbours' primary
    keys are cached for SEMANTIC["SIMILAR_CACHE_TIMEOUT"] under the row's
    vector hash: an edited row is looked up afresh once re-embedded. Rows
    added since can take that long to appear. A cache that is down costs a
    search, never an error.
    """
    check_k(k)
    model = type(obj)
    embedding_field = get_embedding_field(model, field)
    vector_hash = getattr(obj, embedding_field.vector_hash_attname, None)
    if obj.pk is None or not vector_hash:
        return []
    # The slot searched (semantic.switching) is in the key: a promotion or a
    # rollback never serves the other model's neighbours.
    slot = live_slot(embedding_field, obj._state.db or "default")
    key = f"{SIMILAR_PREFIX}{model._meta.label_lower}.{embedding_field.name}:{obj.pk}:{vector_hash}:{slot.alias}:{k}"
    pks = _cached_pks(key)
    if pks is None:
        try:
            pks = list(_searchable(model, obj).similar_to(obj, field=field, k=k).values_list("pk", flat=True))
        except ValueError:  # no searchable vector (yet)
            return []
        try:
            embedding_cache.set_record(key, {"pks": pks}, semantic_settings.SIMILAR_CACHE_TIMEOUT)
        except Exception:
            logger.warning("semantic: could not cache similar items", exc_info=True)
    # By str: keys that came back from JSON (UUIDs) are strings.
    rows = {str(pk): row for pk, row in model._default_manager.using(obj._state.db).in_bulk(pks).items()}
    return [rows[str(pk)] for pk in pks if str(pk) in rows]


def _cached_pks(key):
    try:
        record = embedding_cache.get_record(key)
    except Exception:
        logger.warning("semantic: could not read similar items from the cache", exc_info=True)
        return None
    # A cached value is untrusted: only a list of plain keys is used.
    pks = record.get("pks") if record else None
    if isinstance(pks, list) and all(isinstance(pk, (int, str)) and not isinstance(pk, bool) for pk in pks):
        return pks
    return None


def _searchable(model, obj):
    queryset = model._default_manager.using(obj._state.db).all()
    if isinstance(queryset, SemanticQuerySet):
        return queryset
    return SemanticQuerySet(model=model, using=obj._state.db)


@register.simple_tag
def snippet(result, query, field=None):
    """``result``'s passage with ``query``'s words in ``<mark>`` (safe HTML).

    Uses ``result.snippet`` when the search view set it; otherwise one query
    per call (semantic.highlight.attach_snippets does a page in one).
    """
    existing = getattr(result, "snippet", None)
    if existing is not None:
        return existing
    return highlight([passage(result, get_embedding_field(type(result), field))], query, using=result._state.db)[0]
