"""The chunk table's HNSW build parameters: EmbeddingField(chunk_index={...}). No database."""

import pytest
from django.db import models
from django.db.migrations.state import ModelState
from django.test.utils import isolate_apps

from semantic import EmbeddingField
from semantic.chunking import CHUNK_INDEX_DEFAULTS, chunk_index_options


def declare(**options):
    """A model with a chunked field given ``options``, declared in isolated apps; returns the field."""

    @isolate_apps("tests.testapp")
    def build():
        class Paper(models.Model):
            text = models.TextField()
            embedding = EmbeddingField(source="text", model="tiny", **options)

            class Meta:
                app_label = "testapp"

        return Paper._meta.get_field("embedding")

    return build()


def chunk_index(field):
    [index] = field.chunk_model._meta.indexes
    return index


def test_the_chunk_index_is_built_with_the_defaults():
    field = declare()
    assert field.chunk_index == CHUNK_INDEX_DEFAULTS
    index = chunk_index(field)
    assert (index.m, index.ef_construction) == (CHUNK_INDEX_DEFAULTS["m"], CHUNK_INDEX_DEFAULTS["ef_construction"])
    assert index.get_with_params() == [f"m = {index.m}", f"ef_construction = {index.ef_construction}"]


def test_the_field_sets_the_chunk_index_and_its_migration_carries_it():
    field = declare(chunk_index={"m": 24, "ef_construction": 200})
    state = ModelState.from_model(field.chunk_model)
    [index] = state.options["indexes"]
    path, args, kwargs = index.deconstruct()
    assert path == "pgvector.django.indexes.HnswIndex"
    assert kwargs["m"] == 24 and kwargs["ef_construction"] == 200
    assert kwargs["opclasses"] == ["vector_cosine_ops"]


def test_a_key_left_out_keeps_its_default():
    assert declare(chunk_index={"m": 24}).chunk_index == {**CHUNK_INDEX_DEFAULTS, "m": 24}
    assert chunk_index_options({"ef_construction": 300}) == {**CHUNK_INDEX_DEFAULTS, "ef_construction": 300}


def test_the_owner_column_does_not_change_with_the_chunk_index():
    # The chunk model's index is what migrations rebuild; an AlterField of
    # the owner's column would be a migration operation that does nothing.
    one, other = declare(), declare(chunk_index={"m": 32, "ef_construction": 200})
    assert one.deconstruct()[1:] == other.deconstruct()[1:]
    assert "chunk_index" not in other.deconstruct()[3]


@pytest.mark.parametrize(
    "options, message",
    [
        ("m=32", "chunk_index must be a dict such as"),
        ([("m", 32)], "chunk_index must be a dict such as"),
        ({"M": 32}, "unknown key(s) 'M'"),
        ({"m": 16, "ef_search": 100}, "unknown key(s) 'ef_search'"),
        ({"m": 1}, "chunk_index['m'] must be an integer from 2 to 100 (pgvector's limits), not 1."),
        ({"m": 101}, "chunk_index['m'] must be an integer from 2 to 100"),
        ({"m": 16.0}, "chunk_index['m'] must be an integer from 2 to 100 (pgvector's limits), not 16.0."),
        ({"m": True}, "chunk_index['m'] must be an integer"),
        ({"m": "16"}, "chunk_index['m'] must be an integer"),
        ({"ef_construction": 3}, "chunk_index['ef_construction'] must be an integer from 4 to 1000"),
        ({"ef_construction": 1001}, "chunk_index['ef_construction'] must be an integer from 4 to 1000"),
        ({"m": 48, "ef_construction": 64}, "chunk_index['ef_construction'] must be at least 2 * m = 96"),
    ],
)
def test_a_chunk_index_pgvector_would_refuse_is_a_clear_error(options, message):
    with pytest.raises(ValueError) as raised:
        declare(chunk_index=options)
    assert message in str(raised.value)


def test_a_chunk_index_without_a_chunk_table_is_an_error():
    with pytest.raises(ValueError, match="chunks=False has no chunk table"):
        declare(chunks=False, chunk_index={"m": 24})
    assert declare(chunks=False).chunk_model is None
