from django.core.exceptions import ImproperlyConfigured
from django.shortcuts import render

from project.demo.models import Article
from semantic.status import FRESH, count_statuses

MAX_QUERY_LENGTH = 1000
RESULTS = 10


def search(request):
    """The demo's search page: a query box, ranked results with scores."""
    query = request.GET.get("q", "").strip()[:MAX_QUERY_LENGTH]
    topic = request.GET.get("topic", "")
    mode = request.GET.get("mode", "semantic")
    topics = Article.objects.order_by("topic").values_list("topic", flat=True).distinct()
    counts = count_statuses(Article._meta.get_field("embedding"))
    context = {
        "query": query,
        "topic": topic,
        "mode": mode,
        "topics": list(topics),
        "results": [],
        "total": counts["rows"],
        "embedded": counts[FRESH],
        "error": "",
    }
    if query:
        articles = Article.objects.all()
        if topic:
            articles = articles.filter(topic=topic)
        try:
            if mode == "hybrid":
                # Keyword rank and vector rank fused: exact names and rare words count too.
                results = articles.hybrid_search(query, k=RESULTS)
            else:
                results = articles.semantic_search(query, k=RESULTS)
            context["results"] = list(results.defer("embedding"))
        except ImproperlyConfigured as exc:
            context["error"] = str(exc)
    return render(request, "demo/search.html", context)
