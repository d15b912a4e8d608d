"""
The search form: a visitor's query and search mode, cleaned the way every search cleans them.
"""

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import ProhibitNullCharactersValidator

from semantic.conf import semantic_settings
from semantic.retrieval.options import clean_query

# Mode name -> label. "semantic" ranks by meaning, "hybrid" fuses meaning
# with PostgreSQL full-text rank, "keyword" is full-text rank alone.
MODES = {"semantic": "Meaning", "hybrid": "Meaning + keywords", "keyword": "Keywords"}


class SearchInput(forms.TextInput):
    input_type = "search"


class SemanticSearchForm(forms.Form):
    """``q`` (required to search) and ``mode`` (one of ``modes``, default the first).

    ``q`` is cleaned by semantic.retrieval.options.clean_query: control
    characters become spaces, and a query that is empty after that or longer
    than SEMANTIC["QUERY_MAX_CHARS"] is a form error, so a view shows a
    message and never reaches the search.
    """

    q = forms.CharField(label="Search", required=False, strip=False, widget=SearchInput)
    mode = forms.ChoiceField(label="Mode", required=False)

    def __init__(self, *args, modes=tuple(MODES), **kwargs):
        super().__init__(*args, **kwargs)
        unknown = set(modes) - set(MODES)
        if unknown or not modes:
            raise ValueError(f"modes must be a non-empty choice of {', '.join(MODES)}; unknown: {sorted(unknown)}.")
        self.modes = tuple(modes)
        self.fields["mode"].choices = [(mode, MODES[mode]) for mode in self.modes]
        # Django refuses NUL in any CharField; clean_query turns it into a
        # space like every other control character, as the ORM call does.
        self.fields["q"].validators = [
            v for v in self.fields["q"].validators if not isinstance(v, ProhibitNullCharactersValidator)
        ]
        limit = semantic_settings.QUERY_MAX_CHARS
        self.fields["q"].widget.attrs.update({"maxlength": limit, "placeholder": "Search", "aria-label": "Search"})

    @property
    def has_query(self):
        """Whether the visitor asked anything (a form without ``q`` is the empty search page, not an error)."""
        return bool(self.data.get("q", "").strip())

    def clean_q(self):
        try:
            return clean_query(self.cleaned_data["q"])
        except ValueError as exc:
            raise ValidationError(str(exc), code="query") from exc

    def clean_mode(self):
        return self.cleaned_data["mode"] or self.modes[0]
