"""
The search rate limit: anonymous searches per client address.

Each new query runs the encoder in the web process, so one address must not
be able to make it run without bound. Counted by django-ratelimit with the
cache's atomic INCR (never a pickled value read back from Redis, as DRF's
own throttles would store). Used by the search view and the REST filter.
"""

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def over_search_rate(request, group, rate):
    """Count this search and say whether it is over ``rate`` (e.g. "30/m") for its address.

    Never for a signed-in user, or when ``rate`` is empty. ``group`` names
    the counter (one per view). Requests without an address (WSGI does not
    require REMOTE_ADDR, and django-ratelimit fails on its absence) share
    one count. ImproperlyConfigured when django-ratelimit is not installed.
    """
    user = getattr(request, "user", None)
    if not rate or (user is not None and user.is_authenticated):
        return False
    try:
        from django_ratelimit.core import is_ratelimited
    except ImportError as exc:
        raise ImproperlyConfigured(
            'A search rate needs django-ratelimit: pip install django-ratelimit, or set SEMANTIC["SEARCH_RATE"] = None.'
        ) from exc
    key = "ip"
    if not request.META.get("REMOTE_ADDR") and not getattr(settings, "RATELIMIT_IP_META_KEY", None):
        key = _no_address
    return is_ratelimited(request, group=group, key=key, rate=rate, increment=True)


def _no_address(group, request):
    return "no-address"
