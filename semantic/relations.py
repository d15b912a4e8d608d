"""
Sources that follow relations, and the database triggers that keep them fresh.

A source name with ``__`` walks relations from the row to an attribute of
the model it reaches, as a query lookup does: ``author__name`` (a foreign
key), ``tags__name`` (many-to-many), ``reviews__text`` (a reverse foreign
key), ``author__publisher__name`` (several hops). A hop to many objects
contributes each of their values, in primary-key order, joined by ", ". A
callable source declares what it reads with ``depends_on``, in the same
syntax.

Such a text changes when another table does, so no hook of the row's own
model can see it: semantic.triggers installs, from the watches this module
lists, database triggers that mark the dependent rows stale.
"""

from dataclasses import dataclass

from django.core.exceptions import FieldDoesNotExist, ObjectDoesNotExist
from django.db.models import ForeignObjectRel
from django.db.models.constants import LOOKUP_SEP

from semantic.hashing import clean_text

# Between the values of a hop to many objects.
VALUES_SEPARATOR = ", "


@dataclass(frozen=True)
class Hop:
    """One relation of a path: from ``source`` instances through ``accessor`` to ``target`` ones."""

    name: str  # as written in the path (a query name)
    relation: object  # the Field or ForeignObjectRel
    source: type
    target: type
    accessor: str  # the attribute on ``source`` instances
    to_many: bool


@dataclass(frozen=True)
class SourcePath:
    """A source name that follows relations: its hops and the attribute it reads at the end."""

    name: str
    hops: tuple
    attribute: str

    def lookup(self, hops):
        """The query lookup through the first ``hops`` hops ('' for none)."""
        return LOOKUP_SEP.join(hop.name for hop in self.hops[:hops])

    @property
    def relation_lookup(self):
        return self.lookup(len(self.hops))

    @property
    def to_many(self):
        return any(hop.to_many for hop in self.hops)


def is_path(name):
    """Whether the source name ``name`` follows relations."""
    return isinstance(name, str) and LOOKUP_SEP in name


def parse_path(model, name):
    """The SourcePath of ``name`` on ``model``; ValueError saying what is wrong with it."""
    *relations, attribute = name.split(LOOKUP_SEP)
    current, hops = model, []
    for part in relations:
        try:
            relation = current._meta.get_field(part)
        except FieldDoesNotExist:
            raise ValueError(f"{name!r}: {current.__name__} has no relation {part!r}.") from None
        if not relation.is_relation or relation.related_model is None:
            raise ValueError(f"{name!r}: {current.__name__}.{part} is not a relation to one model.")
        reverse = isinstance(relation, ForeignObjectRel)
        hops.append(
            Hop(
                name=part,
                relation=relation,
                source=current,
                target=relation.related_model,
                accessor=relation.get_accessor_name() if reverse else relation.name,
                to_many=bool(relation.many_to_many or relation.one_to_many),
            )
        )
        current = relation.related_model
    if not attribute or not has_attribute(current, attribute):
        raise ValueError(f"{name!r}: {current.__name__} has no field or attribute {attribute!r}.")
    return SourcePath(name, tuple(hops), attribute)


def has_attribute(model, name):
    """Whether ``model`` has a field (of any kind) or a class attribute ``name``."""
    try:
        model._meta.get_field(name)
        return True
    except FieldDoesNotExist:
        return hasattr(model, name)


def path_values(instance, path):
    """The cleaned, non-empty values ``path`` reaches from ``instance``, in primary-key order where many."""
    objects = [instance]
    for hop in path.hops:
        reached = []
        for obj in objects:
            if hop.to_many:
                # .all() reads a prefetch where there is one; sorted here,
                # not in SQL, so a prefetch's order cannot change the text.
                reached.extend(sorted(getattr(obj, hop.accessor).all(), key=lambda related: related.pk))
                continue
            try:
                related = getattr(obj, hop.accessor)
            except ObjectDoesNotExist:  # a reverse one-to-one without its row
                related = None
            if related is not None:
                reached.append(related)
        objects = reached
    return [value for value in (attribute_text(obj, path.attribute) for obj in objects) if value]


def attribute_text(obj, name):
    """The cleaned text of ``obj.name`` ('' for None); a method is called."""
    value = getattr(obj, name)
    if callable(value):
        value = value()
    return "" if value is None else clean_text(str(value))


def path_text(instance, path):
    """The text ``path`` contributes: its values joined by VALUES_SEPARATOR ('' for none)."""
    return VALUES_SEPARATOR.join(path_values(instance, path))


def with_related(queryset, paths):
    """``queryset`` loading what ``paths`` read in few queries: joins to one object, prefetches to many."""
    joined = [path.relation_lookup for path in paths if not path.to_many]
    prefetched = [path.relation_lookup for path in paths if path.to_many]
    if joined:
        queryset = queryset.select_related(*joined)
    if prefetched:
        queryset = queryset.prefetch_related(*prefetched)
    return queryset


# --- what to watch ----------------------------------------------------------------


@dataclass(frozen=True)
class Watch:
    """Changes to ``model``'s table that change the texts of rows reaching its rows.

    ``events``: the statements that matter. ``columns``: for UPDATE, the
    columns whose change matters. ``key``: the column whose old and new
    values name the objects the dependent rows reach, ``lookup`` the owner's
    query lookup that takes those values (``pk__in``,
    ``author__pk__in``).
    """

    model: type
    table: str
    events: tuple
    columns: tuple
    key: str
    lookup: str


def _lookup_to(path, hops, field_name):
    prefix = path.lookup(hops)
    return f"{prefix}{LOOKUP_SEP}{field_name}__in" if prefix else f"{field_name}__in"


def watches(field):
    """The Watch list of ``field``'s source paths and ``depends_on`` (empty when it follows no relation)."""
    found = []
    for path in field.related_paths():
        last = path.hops[-1].target
        try:
            attribute = last._meta.get_field(path.attribute)
            columns = (attribute.column,) if attribute.concrete and attribute.column else None
        except FieldDoesNotExist:
            columns = None
        if columns is None:
            # A property or a method: it may read any column of its model,
            # but not an embedding's own (the triggers write those).
            columns = tuple(
                f.column
                for f in last._meta.concrete_fields
                if f.column and not hasattr(f, "embedding_field") and not hasattr(f, "hidden_column_names")
            )
        found.append(
            Watch(last, last._meta.db_table, ("UPDATE",), columns, last._meta.pk.column, _lookup_to(path, len(path.hops), last._meta.pk.name))
        )
        for index, hop in enumerate(path.hops):
            relation = hop.relation
            if relation.many_to_many:
                if isinstance(relation, ForeignObjectRel):  # the reverse side of a ManyToManyField
                    m2m, through = relation.field, relation.through
                    key = through._meta.get_field(m2m.m2m_reverse_field_name())
                else:
                    m2m, through = relation, relation.remote_field.through
                    key = through._meta.get_field(m2m.m2m_field_name())
                found.append(
                    Watch(
                        through, through._meta.db_table, ("INSERT", "UPDATE", "DELETE"),
                        tuple(f.column for f in through._meta.concrete_fields if not f.primary_key),
                        key.column, _lookup_to(path, index, key.target_field.name),
                    )
                )
            elif isinstance(relation, ForeignObjectRel):  # a reverse foreign key or one-to-one
                key = relation.field
                found.append(
                    Watch(
                        hop.target, hop.target._meta.db_table, ("INSERT", "UPDATE", "DELETE"),
                        (key.column,), key.column, _lookup_to(path, index, key.target_field.name),
                    )
                )
            else:  # a foreign key or one-to-one on the hop's source model
                source = hop.source
                found.append(
                    Watch(
                        source, source._meta.db_table, ("UPDATE",), (relation.column,),
                        source._meta.pk.column, _lookup_to(path, index, source._meta.pk.name),
                    )
                )
    # One per table, events and key: two paths through the same link watch it once.
    merged = {}
    for watch in found:
        slot = (watch.table, watch.events, watch.key, watch.lookup)
        if slot in merged:
            columns = tuple(dict.fromkeys(merged[slot].columns + watch.columns))
            merged[slot] = Watch(watch.model, watch.table, watch.events, columns, watch.key, watch.lookup)
        else:
            merged[slot] = watch
    return list(merged.values())


def watched_models(field):
    """The models (through models included) whose changes may change ``field``'s texts."""
    return list(dict.fromkeys(watch.model for watch in watches(field)))


def watched_field_names(field, model):
    """The names and attnames of ``model``'s fields whose change matters to ``field``."""
    columns = {column for watch in watches(field) if watch.model is model for column in watch.columns}
    names = set()
    for model_field in model._meta.concrete_fields:
        if model_field.column in columns:
            names.update({model_field.name, model_field.attname})
    return names
