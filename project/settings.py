"""
Settings for the semantic demo project.

Zero-config by default: without DATABASE_URL an embedded PostgreSQL with
pgvector is started in SEMANTIC_DATA_DIR (default ``.data/``), and without
REDIS_URL a local redis-server; both are shared by all processes of the
project and stop when the last one exits (see project/devservices.py).
"""

import os
from pathlib import Path

import dj_database_url

# Models come from local folders or installed packages, never from a hub:
# fail at once on a hub name instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from project import devservices

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SEMANTIC_DATA_DIR", BASE_DIR / ".data"))

DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")

# The development key only ever signs development sessions: with DEBUG off,
# a missing, short or published key refuses to start (a known key lets
# anyone forge sessions and password-reset links).
DEVELOPMENT_SECRET_KEY = "insecure-demo-key-change-me"
PUBLISHED_SECRET_KEYS = {DEVELOPMENT_SECRET_KEY, "change-me", "changeme", "secret", "django-insecure"}
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", DEVELOPMENT_SECRET_KEY if DEBUG else "")
if not DEBUG and (SECRET_KEY in PUBLISHED_SECRET_KEYS or len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "DJANGO_DEBUG=0 needs DJANGO_SECRET_KEY: at least 50 random characters, not a published default. "
        'Make one with: python -c "import secrets; print(secrets.token_urlsafe(50))"'
    )

# HTTPS, with DEBUG off: TLS is terminated by a proxy in front of gunicorn,
# which must set X-Forwarded-Proto (and strip it from clients). Each can be
# turned off through the environment (DJANGO_SECURE_SSL_REDIRECT=0 to try
# the stack over plain HTTP on localhost; `check --deploy` then says so).


def _env_flag(name, default):
    return os.environ.get(name, "1" if default else "0") == "1"


if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = _env_flag("DJANGO_SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _env_flag("DJANGO_SECURE_COOKIES", True)
    SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", str(60 * 60 * 24 * 365)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_flag("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = _env_flag("DJANGO_SECURE_HSTS_PRELOAD", True)
    CSRF_TRUSTED_ORIGINS = [origin for origin in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if origin]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    # Required by pgvector's HnswIndex on Django 6; harmless on 5.2.
    "django.contrib.postgres",
    "semantic",
    "project.demo",
    # The demo's REST API (/api/articles/, described at /api/schema/).
    "rest_framework",
    "django_filters",
    "drf_spectacular",
]

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Sessions only (staff signed in through the admin): HTTP Basic would run
    # the password hasher on every request that carries credentials, a cost
    # any anonymous client could ask for.
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "semantic demo API",
    "DESCRIPTION": "BBC News articles, searched by meaning.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

# Anonymous searches per visitor address: SEMANTIC["SEARCH_RATE"] below,
# counted by django-ratelimit in the default cache with INCRBY (atomic; not
# in INSTALLED_APPS: its only check warns that Django's own RedisCache is
# "not officially supported"). Behind a proxy, set RATELIMIT_IP_META_KEY to
# the header the proxy sets (e.g. "HTTP_X_FORWARDED_FOR"). With the cache
# unreachable searches are allowed: the library's own bounds still hold
# (SEMANTIC's QUERY_MAX_CHARS, MAX_K, MAX_CANDIDATES).
RATELIMIT_FAIL_OPEN = True

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

if not DEBUG:
    # runserver serves static files in development; gunicorn needs help.
    MIDDLEWARE.insert(1, "whitenoise.middleware.WhiteNoiseMiddleware")

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    DATABASES = {"default": devservices.embedded_postgres(DATA_DIR)}

# Every connection starts with the vector index settings of a default search
# (semantic.retrieval.session.connection_options() prints them for other
# SEMANTIC values), so a search needs no SET LOCAL and no transaction of its
# own: one round trip instead of four.
_options = DATABASES["default"].setdefault("OPTIONS", {})
_options["options"] = " ".join(
    filter(None, [_options.get("options"), "-c hnsw.ef_search=100 -c hnsw.iterative_scan=relaxed_order -c ivfflat.iterative_scan=relaxed_order"])
)

REDIS_URL = os.environ.get("REDIS_URL") or devservices.local_redis(DATA_DIR)
# The caches (embeddings, rate limits, wake-up flags) may live in a Redis of
# their own with an LRU bound (docker-compose.yml's "cache"); by default the
# broker's server, another database.
CACHE_URL = os.environ.get("CACHE_URL") or REDIS_URL.rsplit("/", 1)[0] + "/1"

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": CACHE_URL,
        "KEY_PREFIX": "semantic-demo",
        # A save touches the cache (to coalesce wake-ups): with Redis's host
        # unreachable it must fail fast, not after redis-py's default of 5 s.
        "OPTIONS": {"socket_connect_timeout": 0.5},
    },
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

SEMANTIC = {
    # Where semantic_finetune writes the models it trains: each is then an
    # alias by its directory's name, for the web and worker processes alike.
    "MODELS_DIR": os.environ.get("SEMANTIC_MODELS_DIR", str(BASE_DIR / "models")),
    "DEVICE": os.environ.get("SEMANTIC_DEVICE", "auto"),
    "QUEUE": os.environ.get("SEMANTIC_QUEUE", "semantic"),
    "SEARCH_RATE": os.environ.get("SEARCH_RATE", "30/m"),
}

# Celery: Redis broker, JSON only (a worker running as root refuses pickle).
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ROUTES = {"semantic.*": {"queue": SEMANTIC["QUEUE"]}}
# `celery -A project beat` runs the sweeps that catch rows nothing woke
# (lost wake-ups, raw SQL edits). See semantic/tasks.py.
CELERY_BEAT_SCHEDULE = {
    "semantic-sweep": {"task": "semantic.sweep", "schedule": 300.0},
    "semantic-rehash": {"task": "semantic.sweep", "schedule": 86400.0, "kwargs": {"rehash": True}},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "semantic": {"handlers": ["console"], "level": os.environ.get("SEMANTIC_LOG_LEVEL", "INFO"), "propagate": False},
    },
}
