"""
Save hooks: once a save commits, wake a worker. No model is loaded or run here.

A full ``save()`` writes the text and its hash in one statement (the hash
column computes itself, see semantic.fields). ``save(update_fields=...)``
that writes some of the text's columns but not all of them with the hash
cannot know the row's text, so the row is marked stale instead
(status.stale_mark) and the worker reads and hashes the text.

A text that follows relations (semantic.relations) is marked stale by
database triggers when a related row changes (semantic.triggers); the
hooks on the related models here only wake a worker once the change
commits.
"""

from django.db.models.signals import m2m_changed, post_delete, post_save

from semantic.fields import embedding_fields
from semantic.relations import watched_field_names, watched_models
from semantic.status import stale_mark
from semantic.wakeups import schedule_embedding


def connect(model):
    """Install the hooks on one model with embedding fields (called by AppConfig.ready)."""
    post_save.connect(handle_post_save, sender=model, dispatch_uid=f"semantic:{model._meta.label_lower}")
    for field in embedding_fields(model):
        if field.follows_relations:
            try:
                related_models = watched_models(field)
            except ValueError:
                continue  # a path that does not resolve: semantic.E001 says which
            for related in related_models:
                connect_related(field, related)


def connect_related(field, related):
    """Wake ``field``'s worker after ``related`` rows change in a way its triggers watch."""
    owner = field.model
    relevant = watched_field_names(field, related)
    uid = f"semantic:{owner._meta.label_lower}.{field.name}:{related._meta.label_lower}"

    def saved(sender, update_fields=None, using=None, **kwargs):
        if update_fields is None or relevant & set(update_fields):
            schedule_embedding(owner, field.name, using=using)

    def deleted(sender, using=None, **kwargs):
        schedule_embedding(owner, field.name, using=using)

    def m2m(sender, action, using=None, **kwargs):
        if action in ("post_add", "post_remove", "post_clear"):
            schedule_embedding(owner, field.name, using=using)

    post_save.connect(saved, sender=related, weak=False, dispatch_uid=f"{uid}:save")
    post_delete.connect(deleted, sender=related, weak=False, dispatch_uid=f"{uid}:delete")
    # Sent with a through model as sender; other models never send it.
    m2m_changed.connect(m2m, sender=related, weak=False, dispatch_uid=f"{uid}:m2m")


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
