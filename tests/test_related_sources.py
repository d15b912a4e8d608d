"""Texts built across relations stay fresh when the related rows change, by every write path.

Book.embedding reads ``title``, ``author__name``, ``author__publisher__name``
and ``tags__name``; Book.reviewed is a callable over ``reviews`` declared
with ``depends_on``. The invariant: after any change to a related row, the
rows whose text it changes, and only those, are pending at once (the
change's own statement marked them); after the worker runs, every book is
fresh under both fields with the vector of the text built here, from the
database, independently of the app's code.
"""

import random
import uuid

import numpy as np
import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from semantic.status import FRESH, embedding_status
from semantic.triggers import install_triggers, installed_triggers
from tests.conftest import embed_until_idle, wait_until
from tests.testapp.models import Author, Book, Publisher, Review, Tag

pytestmark = pytest.mark.django_db(transaction=True)

EMBEDDING = Book._meta.get_field("embedding")
REVIEWED = Book._meta.get_field("reviewed")


def unique_text(text):
    """``text`` made unique (the embedding cache outlives tests), short enough for one chunk of the tiny model."""
    return f"{text} {uuid.uuid4().hex[:4]}"


@pytest.fixture(scope="module")
def oracle():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(settings.TINY_MODEL_DIR), device="cpu")
    return lambda text: model.encode(text, normalize_embeddings=True)


def expected_texts(pk):
    """Both fields' texts of book ``pk``, read with plain queries."""
    book = Book.objects.get(pk=pk)
    parts = [book.title]
    author = Author.objects.filter(books=book).select_related("publisher").first()
    if author is not None:
        parts.append(author.name)
        if author.publisher is not None:
            parts.append(author.publisher.name)
    tags = [tag.name for tag in Tag.objects.filter(books=book).order_by("pk")]
    if tags:
        parts.append(", ".join(tags))
    reviews = [review.text for review in Review.objects.filter(book=book).order_by("pk")]
    return "\n\n".join(parts), "\n".join([book.title, *reviews])


def embed_all():
    """Run the worker here until nothing is pending (rows claimed by the session's Celery worker, if it runs, included)."""
    for field in (EMBEDDING, REVIEWED):
        embed_until_idle(field)


def statuses(field):
    return {book.pk: embedding_status(field, book) for book in Book.objects.all()}


def stale(field):
    return {pk for pk, status in statuses(field).items() if status != FRESH}


def assert_all_fresh_with_their_texts(oracle):
    for book in Book.objects.all():
        text, reviewed = expected_texts(book.pk)
        assert embedding_status(EMBEDDING, book) == FRESH, book.pk
        assert embedding_status(REVIEWED, book) == FRESH, book.pk
        assert np.allclose(book.embedding, oracle(text), atol=1e-5), (book.pk, text)
        assert np.allclose(book.reviewed, oracle(reviewed), atol=1e-5), (book.pk, reviewed)


@pytest.fixture
def library():
    """Two publishers, three authors, three tags, six books (one without an author), all fresh."""
    p1, p2 = Publisher.objects.create(name=unique_text("Penguin")), Publisher.objects.create(name=unique_text("Faber"))
    a1 = Author.objects.create(name=unique_text("Ursula Le Guin"), publisher=p1)
    a2 = Author.objects.create(name=unique_text("Iain Banks"), publisher=p2)
    a3 = Author.objects.create(name=unique_text("Ted Chiang"), publisher=p1)
    tags = [Tag.objects.create(name=unique_text(name)) for name in ("science fiction", "fantasy", "essays")]
    books = [
        Book.objects.create(title=unique_text(title), author=author)
        for title, author in (
            ("The Dispossessed", a1),
            ("A Wizard of Earthsea", a1),
            ("Consider Phlebas", a2),
            ("The Player of Games", a2),
            ("Exhalation", a3),
            ("Anonymous pamphlet", None),
        )
    ]
    books[0].tags.add(tags[0])
    books[1].tags.add(tags[1])
    books[2].tags.add(tags[0], tags[2])
    Review.objects.create(book=books[0], text=unique_text("An ambiguous utopia."))
    embed_all()
    assert not stale(EMBEDDING) and not stale(REVIEWED)
    return {"publishers": [p1, p2], "authors": [a1, a2, a3], "tags": tags, "books": books}


def pks(*books):
    return {book.pk for book in books}


def test_triggers_are_installed_by_migrate_and_reinstalling_changes_nothing():
    from semantic.triggers import wanted_triggers

    wanted = wanted_triggers(connection, "default")
    tables = {trigger.table for trigger in wanted.values()}
    for model in (Author, Publisher, Tag, Review, Book, Book.tags.through):
        assert model._meta.db_table in tables, model
    present = installed_triggers(connection)
    assert all(present.get(name) == trigger.trigger_names for name, trigger in wanted.items()), "migrate installed them"
    assert install_triggers("default") == (0, 0)


def test_a_function_missing_one_of_its_triggers_is_made_again_whole():
    from semantic.triggers import wanted_triggers

    tag_trigger = next(trigger for trigger in wanted_triggers(connection, "default").values() if trigger.table == Book.tags.through._meta.db_table)
    dropped = sorted(tag_trigger.trigger_names)[0]
    with connection.cursor() as cursor:
        cursor.execute(f'DROP TRIGGER "{dropped}" ON {tag_trigger.table}')
    assert install_triggers("default") == (1, 1)
    assert installed_triggers(connection)[tag_trigger.name] == tag_trigger.trigger_names


def test_a_trigger_no_field_needs_is_dropped():
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION semantic_dep_left_over() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;"
            f" CREATE TRIGGER semantic_dep_left_over_u AFTER UPDATE ON {Tag._meta.db_table} FOR EACH STATEMENT"
            " EXECUTE FUNCTION semantic_dep_left_over()"
        )
    assert "semantic_dep_left_over" in installed_triggers(connection)
    assert install_triggers("default") == (0, 1)
    assert "semantic_dep_left_over" not in installed_triggers(connection)


def test_the_texts_follow_the_relations(library, oracle):
    assert_all_fresh_with_their_texts(oracle)
    book = Book.objects.get(pk=library["books"][2].pk)
    text = EMBEDDING.build_text(book)
    assert library["authors"][1].name in text and library["publishers"][1].name in text
    assert ", ".join(tag.name for tag in sorted([library["tags"][0], library["tags"][2]], key=lambda t: t.pk)) in text


# --- each write path marks exactly the rows whose text it changes -------------------------


def rename_author_by_save(lib):
    author = lib["authors"][0]
    author.name = unique_text("Ursula K. Le Guin")
    author.save()
    return pks(*lib["books"][:2]), set()


def rename_author_by_update(lib):
    Author.objects.filter(pk=lib["authors"][0].pk).update(name=unique_text("U. K. Le Guin"))
    return pks(*lib["books"][:2]), set()


def rename_authors_by_bulk_update(lib):
    a1, a2 = lib["authors"][:2]
    a1.name, a2.name = unique_text("Le Guin"), unique_text("Banks")
    Author.objects.bulk_update([a1, a2], ["name"])
    return pks(*lib["books"][:4]), set()


def rename_author_by_raw_sql(lib):
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {Author._meta.db_table} SET name = %s WHERE id = %s", [unique_text("Banks, Iain"), lib["authors"][1].pk])
    return pks(*lib["books"][2:4]), set()


def rename_publisher(lib):
    publisher = lib["publishers"][0]
    publisher.name = unique_text("Penguin Random House")
    publisher.save()
    return pks(lib["books"][0], lib["books"][1], lib["books"][4]), set()


def move_author_to_another_publisher(lib):
    author = lib["authors"][2]
    author.publisher = lib["publishers"][1]
    author.save()
    return pks(lib["books"][4]), set()


def delete_author(lib):
    lib["authors"][1].delete()  # SET_NULL on Book.author
    return pks(*lib["books"][2:4]), set()


def delete_publisher(lib):
    lib["publishers"][1].delete()  # SET_NULL on Author.publisher
    return pks(*lib["books"][2:4]), set()


def change_a_book_author(lib):
    book = lib["books"][5]
    book.author = lib["authors"][2]
    book.save()  # a save marks each field whose text follows relations: it cannot know their text
    return pks(book), pks(book)


def add_tag(lib):
    lib["books"][4].tags.add(lib["tags"][2])
    return pks(lib["books"][4]), set()


def add_books_to_a_tag_from_its_side(lib):
    lib["tags"][1].books.add(lib["books"][3], lib["books"][5])
    return pks(lib["books"][3], lib["books"][5]), set()


def remove_tag(lib):
    lib["books"][2].tags.remove(lib["tags"][2])
    return pks(lib["books"][2]), set()


def clear_tags(lib):
    lib["books"][2].tags.clear()
    return pks(lib["books"][2]), set()


def clear_a_tag_from_its_side(lib):
    lib["tags"][0].books.clear()
    return pks(lib["books"][0], lib["books"][2]), set()


def set_tags(lib):
    lib["books"][0].tags.set([lib["tags"][1], lib["tags"][2]])
    return pks(lib["books"][0]), set()


def rename_tag(lib):
    tag = lib["tags"][0]
    tag.name = unique_text("SF")
    tag.save()
    return pks(lib["books"][0], lib["books"][2]), set()


def delete_tag(lib):
    lib["tags"][0].delete()
    return pks(lib["books"][0], lib["books"][2]), set()


def add_review(lib):
    Review.objects.create(book=lib["books"][3], text=unique_text("Culture shock."))
    return set(), pks(lib["books"][3])


def edit_review(lib):
    Review.objects.filter(book=lib["books"][0]).update(text=unique_text("A classic."))
    return set(), pks(lib["books"][0])


def delete_review(lib):
    Review.objects.filter(book=lib["books"][0]).delete()
    return set(), pks(lib["books"][0])


def move_review(lib):
    Review.objects.filter(book=lib["books"][0]).update(book=lib["books"][1])
    return set(), pks(lib["books"][0], lib["books"][1])


RELATED_EDITS = [
    rename_author_by_save,
    rename_author_by_update,
    rename_authors_by_bulk_update,
    rename_author_by_raw_sql,
    rename_publisher,
    move_author_to_another_publisher,
    delete_author,
    delete_publisher,
    change_a_book_author,
    add_tag,
    add_books_to_a_tag_from_its_side,
    remove_tag,
    clear_tags,
    clear_a_tag_from_its_side,
    set_tags,
    rename_tag,
    delete_tag,
    add_review,
    edit_review,
    delete_review,
    move_review,
]


@pytest.mark.parametrize("edit", RELATED_EDITS, ids=[edit.__name__ for edit in RELATED_EDITS])
def test_a_related_edit_marks_exactly_its_dependent_rows_and_the_worker_makes_them_fresh(library, edit, oracle):
    marked_embedding, marked_reviewed = edit(library)
    assert stale(EMBEDDING) == marked_embedding
    assert stale(REVIEWED) == marked_reviewed
    embed_all()
    assert_all_fresh_with_their_texts(oracle)


def test_an_edit_of_a_column_no_text_reads_marks_nothing(library):
    author = library["authors"][0]
    author.email = "ursula@example.org"
    author.save()
    Author.objects.update(email="nobody@example.org")
    Book.objects.filter(pk=library["books"][0].pk).update(title=library["books"][0].title)  # the book's own column
    assert stale(EMBEDDING) == pks(library["books"][0])
    assert not stale(REVIEWED) - pks(library["books"][0])


def test_saving_a_book_marks_it_and_the_worker_only_confirms_its_unchanged_text(library, stats_delta):
    book = Book.objects.get(pk=library["books"][0].pk)
    vector_hash = book.embedding_vector_hash
    book.save()
    assert stale(EMBEDDING) == pks(book) and stale(REVIEWED) == pks(book)
    before = stats_delta()["texts_encoded"]
    embed_all()
    book.refresh_from_db()
    assert book.embedding_vector_hash == vector_hash and embedding_status(EMBEDDING, book) == FRESH
    assert stats_delta()["texts_encoded"] == before


def test_a_new_book_is_embedded_with_the_tags_added_after_its_save(library, oracle):
    book = Book.objects.create(title=unique_text("The Lathe of Heaven"), author=library["authors"][0])
    book.tags.add(*library["tags"][:2])
    embed_all()
    assert_all_fresh_with_their_texts(oracle)
    assert library["tags"][1].name in EMBEDDING.build_text(Book.objects.get(pk=book.pk))


def test_an_author_edit_reaching_many_books_is_one_statement(library):
    author = library["authors"][2]
    Book.objects.bulk_create([Book(title=f"Story {i}", author=author) for i in range(500)])
    Book.objects.update(**{EMBEDDING.vector_hash_attname: "x"})  # not fresh, only different from the marks to come
    before = dict(Book.objects.filter(author=author).values_list("pk", EMBEDDING.source_hash_attname))
    author.name = unique_text("Chiang, Ted")
    with CaptureQueriesContext(connection) as queries:
        author.save()
    assert len(queries) == 1, [query["sql"] for query in queries]
    after = dict(Book.objects.filter(author=author).values_list("pk", EMBEDDING.source_hash_attname))
    assert len(after) == 501 and all(after[pk] != before[pk] and after[pk].startswith("stale:") for pk in after)


def test_a_related_edit_wakes_a_worker_that_embeds_it(library, celery_worker, oracle):
    author = library["authors"][1]
    author.name = unique_text("Iain M. Banks")
    author.save()
    wait_until(lambda: not stale(EMBEDDING), message="the author's books re-embedded")
    assert_all_fresh_with_their_texts(oracle)


def test_random_related_edits_end_fresh_with_their_texts(library, oracle):
    """Seeded sequences of every kind of edit above, the worker running between some of them."""
    rng = random.Random(20261205)
    for step in range(40):
        lib = {
            "publishers": list(Publisher.objects.order_by("pk")),
            "authors": list(Author.objects.order_by("pk")),
            "tags": list(Tag.objects.order_by("pk")),
            "books": list(Book.objects.order_by("pk")),
        }
        if len(lib["authors"]) < 3 or len(lib["publishers"]) < 2 or len(lib["tags"]) < 3 or len(lib["books"]) < 6:
            # Deletions ran out of material: make more, as any site would.
            Publisher.objects.create(name=unique_text("Press"))
            Author.objects.create(name=unique_text("Writer"), publisher=Publisher.objects.order_by("?").first())
            Tag.objects.create(name=unique_text("topic"))
            Book.objects.create(title=unique_text("Volume"), author=Author.objects.order_by("?").first())
            continue
        if not Review.objects.filter(book=lib["books"][0]).exists():
            Review.objects.create(book=lib["books"][0], text=unique_text("Noted."))
        rng.choice(RELATED_EDITS)(lib)
        if rng.random() < 0.3:
            embed_all()
    embed_all()
    assert_all_fresh_with_their_texts(oracle)


def test_check_w023_names_the_tables_whose_triggers_are_missing_and_migrate_restores_them():
    from django.core.management import call_command

    from semantic.checks import check_triggers

    assert check_triggers(databases=["default"]) == []
    from semantic.triggers import wanted_triggers

    name = next(name for name, trigger in wanted_triggers(connection, "default").items() if trigger.table == Tag._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f'DROP FUNCTION "{name}"() CASCADE')
    warnings = check_triggers(databases=["default"])
    assert [w.id for w in warnings] == ["semantic.W023"] and Tag._meta.db_table in warnings[0].msg
    call_command("migrate", verbosity=0)
    assert check_triggers(databases=["default"]) == []


# --- paths: what resolves, and what a bad one says (no database) ------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("writer__name", "Book has no relation 'writer'"),
        ("title__name", "Book.title is not a relation"),
        ("author__nickname", "Author has no field or attribute 'nickname'"),
        ("author__", "Author has no field or attribute ''"),
    ],
)
def test_a_path_that_does_not_resolve_says_where(name, message):
    from semantic.relations import parse_path

    with pytest.raises(ValueError, match=message):
        parse_path(Book, name)


def test_paths_resolve_forward_reverse_and_many_to_many_hops():
    from semantic.relations import parse_path

    path = parse_path(Book, "author__publisher__name")
    assert [hop.accessor for hop in path.hops] == ["author", "publisher"] and not path.to_many
    assert path.relation_lookup == "author__publisher" and path.lookup(1) == "author"
    assert parse_path(Book, "tags__name").to_many and parse_path(Book, "reviews__text").to_many
    assert [hop.accessor for hop in parse_path(Publisher, "authors__books__title").hops] == ["authors", "books"]


def test_a_source_path_that_does_not_resolve_is_error_e001():
    from semantic import EmbeddingField

    field = EmbeddingField(source=["title", "author__nickname"], model="tiny")
    field.set_attributes_from_name("embedding")
    field.model = Book
    errors = field._check_source()
    assert [e.id for e in errors] == ["semantic.E001"] and "nickname" in errors[0].msg
    field = EmbeddingField(source=lambda book: book.title, depends_on=["editors__name"], model="tiny")
    field.set_attributes_from_name("embedding")
    field.model = Book
    assert "editors" in field._check_source()[0].msg


def test_an_update_of_the_books_own_foreign_key_marks_them(library):
    Book.objects.filter(pk__in=pks(*library["books"][:2])).update(author=library["authors"][1])
    assert stale(EMBEDDING) == pks(*library["books"][:2])
