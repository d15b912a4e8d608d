"""
The demo's REST API fuzzed from the OpenAPI description it serves itself
(schemathesis, through the WSGI application: no server): no generated
request gets a 500, and every answer is one the description documents
(status code, content type, body schema).
"""

import pytest
import schemathesis
from django.core import signals
from django.core.management import call_command
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from project.demo.models import Article
from semantic.worker import embed_stale_rows

# Not transactional: the rows stay invisible to the in-thread worker other
# modules start; this module embeds them itself.
pytestmark = pytest.mark.django_db

# Examples per run: the five runs below stay
# well under a minute on two cores (most are searches that run the model).
EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def app():
    """The project's WSGI application, run inside the test's transaction.

    Django closes the database connection when a request finishes (outside
    a transaction block it may be stale); here that would end the test's
    transaction, so, as Django's own test client does, not while testing.
    """
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def articles():
    call_command("load_demo_corpus", limit=10, verbosity=0)
    assert embed_stale_rows(Article._meta.get_field("embedding"), time_budget=300).written == 10


LIST, DETAIL = "/api/articles/", "/api/articles/{id}/"
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE


@pytest.mark.parametrize(
    "path, mode, fixed",
    [
        (LIST, POSITIVE, {}),
        # Most generated page numbers are past the last page (a 404), most
        # generated topics have no article: on page 1 of every topic ("" is
        # no filter) the searches, modes and orderings are answered.
        (LIST, POSITIVE, {"query": {"page": 1, "topic": ""}}),
        (LIST, NEGATIVE, {}),
        (DETAIL, POSITIVE, {}),
        (DETAIL, NEGATIVE, {}),
    ],
    ids=["list", "list-page-1", "list-negative", "detail", "detail-negative"],
)
def test_no_generated_request_gets_a_500_or_an_undocumented_answer(app, articles, settings, path, mode, fixed):
    # The throttle still runs on every search; these are not to be refused by it.
    settings.SEMANTIC = {**settings.SEMANTIC, "SEARCH_RATE": "100000/m"}
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", app)
    statuses, scored = [], []

    @given(case=schema[path]["GET"].as_strategy(generation_mode=mode, **fixed))
    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case):
        response = case.call()
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if path == LIST and response.status_code == 200:
            scored.append(any(row["score"] is not None for row in response.json()["results"]))

    answers_as_documented()
    assert len(statuses) >= EXAMPLES // 2 and 500 not in statuses
    if fixed:
        # Not vacuous: generated searches were run and answered with scores.
        assert sum(scored) >= EXAMPLES // 4, sorted(statuses)
