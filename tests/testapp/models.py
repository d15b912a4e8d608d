from django.db import models

from semantic import EmbeddingField, SemanticManager


class Note(models.Model):
    """Pipeline tests: a tiny random model keeps encoding fast."""

    title = models.CharField(max_length=200)
    body = models.TextField(blank=True, null=True)
    category = models.CharField(max_length=20, default="general")

    embedding = EmbeddingField(source=["title", "body"], model="tiny")

    objects = SemanticManager()


class SupportAnswer(models.Model):
    """Meaning tests: the real packaged all-MiniLM-L6-v2."""

    text = models.TextField()

    embedding = EmbeddingField(source="text")

    objects = SemanticManager()


class MismatchedNote(models.Model):
    """A 16-dimensional column over a 32-dimensional model."""

    text = models.TextField()

    embedding = EmbeddingField(source="text", model="tiny_undeclared", dimensions=16)

    objects = SemanticManager()


class LongNote(models.Model):
    """Long-text tests: a 16-token limit, so a few sentences make many chunks."""

    title = models.CharField(max_length=200, blank=True)
    body = models.TextField(blank=True)

    embedding = EmbeddingField(source=["title", "body"], model="tiny_short", chunk_overlap=4)

    objects = SemanticManager()


class TruncatedNote(models.Model):
    """chunks=False: the model truncates long texts, and there is no chunk table."""

    body = models.TextField()

    embedding = EmbeddingField(source="body", model="tiny_short", chunks=False)

    objects = SemanticManager()


class Draft(models.Model):
    """The randomized write-path test: chunked texts, and a chunk limit that a text can exceed."""

    title = models.CharField(max_length=200, blank=True)
    body = models.TextField(blank=True, null=True)

    embedding = EmbeddingField(source=["title", "body"], model="tiny_short", chunk_overlap=4, max_chunks=6)

    objects = SemanticManager()


class ChunkedHeadline(models.Model):
    """bench/read_path.py's chunked table: documents of several 384-dim chunks (MiniLM's size)."""

    title = models.CharField(max_length=300)
    topic = models.CharField(max_length=20)

    embedding = EmbeddingField(source="title")

    objects = SemanticManager()


# --- sources that follow relations (semantic.relations) -----------------------


class Publisher(models.Model):
    name = models.CharField(max_length=100)


class Author(models.Model):
    name = models.CharField(max_length=100)
    email = models.CharField(max_length=100, blank=True)
    publisher = models.ForeignKey(Publisher, null=True, blank=True, on_delete=models.SET_NULL, related_name="authors")


class Tag(models.Model):
    name = models.CharField(max_length=100)


def book_with_reviews(book):
    """A callable source reading a reverse foreign key: declared with depends_on."""
    return "\n".join([book.title, *(review.text for review in sorted(book.reviews.all(), key=lambda review: review.pk))])


class Book(models.Model):
    """Texts built across a foreign key (two hops), a many-to-many and, through a callable, a reverse foreign key."""

    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, null=True, blank=True, on_delete=models.SET_NULL, related_name="books")
    tags = models.ManyToManyField(Tag, blank=True, related_name="books")

    embedding = EmbeddingField(source=["title", "author__name", "author__publisher__name", "tags__name"], model="tiny")
    reviewed = EmbeddingField(source=book_with_reviews, depends_on=["reviews__text"], model="tiny", chunks=False)

    objects = SemanticManager()


class Review(models.Model):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="reviews")
    text = models.TextField()
