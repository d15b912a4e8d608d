from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.shortcuts import render
from django_ratelimit.core import is_ratelimited

from project.demo.models import Article
from semantic.retrieval.options import clean_query
from semantic.status import FRESH, count_statuses

RESULTS = 10
MODES = ("semantic", "hybrid")


def search(request):
    """The demo's search page: a query box, ranked results with scores.

    Every parameter is a visitor's input: an unknown mode or topic, a query
    the library refuses (too long, only control characters) or a visitor
    over the search rate (settings.SEARCH_RATE per address, anonymous only)
    gets a message, never an error page.
    """
    raw_query = request.GET.get("q", "")
    topic = request.GET.get("topic", "")
    mode = request.GET.get("mode", "semantic")
    topics = list(Article.objects.order_by("topic").values_list("topic", flat=True).distinct())
    counts = count_statuses(Article._meta.get_field("embedding"))
    context = {
        "query": raw_query[:1000],
        "topic": topic if topic in topics else "",
        "mode": mode if mode in MODES else MODES[0],
        "topics": topics,
        "results": [],
        "total": counts["rows"],
        "embedded": counts[FRESH],
        "error": "",
    }
    status = 200
    if not raw_query.strip():
        return render(request, "demo/search.html", context)
    if mode not in MODES:
        context["error"] = f"Unknown search mode; choose one of {', '.join(MODES)}."
        status = 400
    elif topic and topic not in topics:
        context["error"] = "Unknown topic."
        status = 400
    elif not request.user.is_authenticated and is_ratelimited(
        request, group="demo.search", key="ip", rate=settings.SEARCH_RATE, increment=True
    ):
        context["error"] = "Too many searches from your address; wait a minute and try again."
        status = 429
    else:
        articles = Article.objects.all()
        if topic:
            articles = articles.filter(topic=topic)
        try:
            query = clean_query(raw_query)
            context["query"] = query
            if mode == "hybrid":
                # Keyword rank and vector rank fused: exact names and rare words count too.
                results = articles.hybrid_search(query, k=RESULTS)
            else:
                results = articles.semantic_search(query, k=RESULTS)
            context["results"] = list(results.defer("embedding"))
        except ValueError as exc:
            context["error"] = str(exc)
            status = 400
        except ImproperlyConfigured as exc:
            context["error"] = str(exc)
            status = 503
    return render(request, "demo/search.html", context, status=status)
