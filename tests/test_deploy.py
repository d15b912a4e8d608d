"""Production settings refuse to be unsafe, and the compose stack is shaped as the README says.

The settings are exercised the way a container starts them: ``manage.py``
in a process of its own, with the environment docker-compose.yml gives.
"""

import os
import secrets
import subprocess
import sys
from urllib.parse import quote

import pytest
import yaml
from django.conf import settings
from django.db import connection

ROOT = settings.BASE_DIR
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def manage(*args, **environment):
    """Run ``manage.py args`` with the project settings and ``environment`` over this one."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        **environment,
    }
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def production(**overrides):
    """The environment compose gives the web process (secrets made up here)."""
    environment = {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "search.example.org",
        "DJANGO_CSRF_TRUSTED_ORIGINS": "https://search.example.org",
    }
    return {**environment, **overrides}


@pytest.mark.django_db
@pytest.mark.parametrize("key", [None, "", "change-me", "insecure-demo-key-change-me", "short-but-random-Xy81", "a" * 64])
def test_debug_off_refuses_to_start_without_a_real_secret_key(key):
    environment = production()
    if key is None:
        del environment["DJANGO_SECRET_KEY"]
    else:
        environment["DJANGO_SECRET_KEY"] = key
    result = manage("check", **environment)
    assert result.returncode != 0
    assert "DJANGO_DEBUG=0 needs DJANGO_SECRET_KEY" in result.stderr


@pytest.mark.django_db
def test_check_deploy_is_clean_with_the_compose_environment():
    result = manage("check", "--deploy", "--fail-level", "WARNING", **production())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.django_db
def test_plain_http_is_possible_and_check_deploy_says_what_it_costs():
    result = manage("check", "--deploy", **production(DJANGO_SECURE_SSL_REDIRECT="0", DJANGO_SECURE_COOKIES="0"))
    assert result.returncode == 0
    for warning in ("security.W008", "security.W012", "security.W016"):
        assert warning in result.stdout + result.stderr


# --- the compose file -------------------------------------------------------------


def command_of(service):
    command = COMPOSE["services"][service]["command"]
    return " ".join(command) if isinstance(command, list) else command


def test_every_secret_is_required_from_the_environment():
    app = COMPOSE["x-app"]["environment"]
    assert "${DJANGO_SECRET_KEY:?" in app["DJANGO_SECRET_KEY"]
    for url, password in (("DATABASE_URL", "POSTGRES_PASSWORD"), ("REDIS_URL", "REDIS_PASSWORD"), ("CACHE_URL", "CACHE_PASSWORD")):
        assert "${" + password + ":?" in app[url]
    assert "change-me" not in (ROOT / "docker-compose.yml").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".env.*" in ignored


def test_the_broker_persists_and_asks_for_a_password_and_the_cache_is_bounded():
    broker = command_of("redis")
    assert "--requirepass" in broker and "--appendonly yes" in broker and "noeviction" in broker
    assert any(volume.endswith(":/data") for volume in COMPOSE["services"]["redis"]["volumes"])
    cache = command_of("cache")
    assert "--requirepass" in cache and "--maxmemory " in cache and "allkeys-lru" in cache


def test_beat_runs_the_sweeps_the_settings_schedule():
    assert "beat" in command_of("beat")
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert scheduled == {"semantic.sweep"}
    assert COMPOSE["services"]["beat"]["environment"] == COMPOSE["x-app"]["environment"]
