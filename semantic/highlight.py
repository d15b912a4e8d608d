"""
Snippets: a passage of a result with the query's words marked, as safe HTML.

PostgreSQL's ``ts_headline`` picks the fragments and marks the words, so a
snippet agrees with the full-text side of hybrid search: the same text
search configuration, the same stemming ("phones" marks "phone"), the same
stop words. A result found by meaning alone, with none of the query's
words, gets the start of its passage unmarked.

The text is a stored row's or chunk's, so it is untrusted HTML: the
headline is escaped, and only the marks this module asked for become
``<mark>`` elements. They are asked for as two private-use characters that
are removed from the text first, so no text can forge one.
"""

from django.db import connections
from django.utils.html import escape
from django.utils.safestring import mark_safe

from semantic.conf import semantic_settings

START, STOP = "\ue000", "\ue001"
_UNMARK = str.maketrans("", "", START + STOP)

# ts_headline reads its whole input: a whole-row text is cut to this many
# characters first (a chunk is far shorter). A match past it is not shown.
MAX_HIGHLIGHT_CHARS = 20_000

# Parameters, so neither the texts nor the query are ever part of the SQL.
# The input is a list of Python strings, not a table the ORM could query.
HEADLINE_SQL = (
    "SELECT ts_headline(%s::regconfig, t.text, websearch_to_tsquery(%s::regconfig, %s), %s) "
    "FROM unnest(%s::text[]) WITH ORDINALITY AS t(text, position) ORDER BY t.position"
)


def headline_options(max_words=35, min_words=15, max_fragments=2):
    """ts_headline's option string; ValueError unless 0 < min_words < max_words and max_fragments >= 0."""
    for name, value in (("max_words", max_words), ("min_words", min_words), ("max_fragments", max_fragments)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, not {value!r}.")
    if not 0 < min_words < max_words or max_fragments < 0:
        raise ValueError("Snippets need 0 < min_words < max_words and max_fragments >= 0.")
    return (
        f"StartSel={START}, StopSel={STOP}, MaxWords={max_words}, MinWords={min_words}, "
        f'ShortWord=3, MaxFragments={max_fragments}, FragmentDelimiter=" … "'
    )


def highlight(texts, query, *, config=None, using="default", **options):
    """One snippet per text, in order: safe HTML with ``query``'s words in ``<mark>``.

    ``config`` is the text search configuration (default
    SEMANTIC["HYBRID_TEXT_CONFIG"]); ``options`` are headline_options'.
    One query for all the texts.
    """
    texts = [(text or "")[:MAX_HIGHLIGHT_CHARS].translate(_UNMARK) for text in texts]
    if not texts:
        return []
    config = config or semantic_settings.HYBRID_TEXT_CONFIG
    query = (query or "").translate(_UNMARK)
    with connections[using].cursor() as cursor:
        cursor.execute(HEADLINE_SQL, [config, config, query, headline_options(**options), texts])
        headlines = [row[0] for row in cursor.fetchall()]
    return [as_safe_html(headline) for headline in headlines]


def as_safe_html(headline):
    """Escape ``headline`` and turn this module's marks into ``<mark>`` elements."""
    return mark_safe(escape(headline).replace(START, "<mark>").replace(STOP, "</mark>"))


def passage(row, field):
    """The text a result is shown by: its best chunk when the search found one, else its whole text."""
    best = getattr(row, "best_chunk", None)
    return best.text if best is not None else field.build_text(row)


def attach_snippets(rows, query, field_of, *, using="default", **options):
    """Set ``row.snippet`` on each row (one query for all); returns the rows.

    ``field_of(row)`` is the EmbeddingField the row was found by (rows of
    several models can be mixed).
    """
    rows = list(rows)
    snippets = highlight([passage(row, field_of(row)) for row in rows], query, using=using, **options)
    for row, snippet in zip(rows, snippets):
        row.snippet = snippet
    return rows
