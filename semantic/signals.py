"""
Save hooks: once a save commits, wake a worker. No model is loaded or run here.

A full ``save()`` writes the text and its hash in one statement (the hash
column computes itself, see semantic.fields). ``save(update_fields=...)``
that writes some of the text's columns but not all of them with the hash
cannot know the row's text, so the row is marked stale instead
(status.stale_mark) and the worker reads and hashes the text.
"""

from django.db.models.signals import post_save

from semantic.fields import embedding_fields
from semantic.status import stale_mark
from semantic.wakeups import schedule_embedding


def connect(model):
    """Install the hooks on one model with embedding fields (called by AppConfig.ready)."""
    post_save.connect(handle_post_save, sender=model, dispatch_uid=f"semantic:{model._meta.label_lower}")


def handle_post_save(sender, instance, created=False, update_fields=None, using=None, **kwargs):
    for field in embedding_fields(sender):
        if update_fields is not None:
            if not field.touched_by(update_fields):
                continue
            if not (field.source_hash_attname in update_fields and field.text_written_by(update_fields)):
                mark = stale_mark(field)
                sender._base_manager.using(using).filter(pk=instance.pk).update(**mark)
                setattr(instance, field.source_hash_attname, mark[field.source_hash_attname])
        if created and getattr(instance, field.source_hash_attname) is None:
            continue  # a new row without text: nothing to embed or remove
        # Also when the text is now empty: the worker removes the old vector and chunks.
        schedule_embedding(sender, field.name, using=using)
