"""
The hashed-text embedding caches, counters and small flags, in Redis, as raw values.

Nothing read from Redis is ever unpickled. Django's RedisCache pickles
every value but an int, and unpickles whatever it reads back: anyone able
to write to the Redis (the broker's clients, a neighbour on an open port)
could plant a pickle under a cache key and run code in every web process
that searched for that text. So this module uses the cache alias only for
its connection pool and key names (``KEY_PREFIX``, ``VERSION``), and
reads and writes with the redis client itself:

* vectors are little-endian float32 bytes. A value that is not exactly
  ``dimensions`` finite float32s (a planted pickle, a truncated write, a
  vector of another width) is ignored: a miss, counted as ``rejected`` and
  logged;
* counters are INCRBY integers, read back only when they are digits;
* flags (a wake-up's coalescing key) are ``SET NX EX``; progress records
  are JSON.

Two key spaces of vectors. ``semantic:emb:<row hash>``: the texts workers
encoded, kept CACHE_TIMEOUT (30 days). ``semantic:query:<row hash>``:
query texts, which anonymous visitors choose, kept QUERY_CACHE_TIMEOUT (an
hour) on QUERY_CACHE_ALIAS (default: CACHE_ALIAS). Every vector has a TTL,
so a Redis with ``maxmemory`` and ``maxmemory-policy volatile-lru`` evicts
the least recently used vectors and never a key without one (the broker's
queues): its ``maxmemory`` is the caches' memory bound.

Row hashes are the encoder fingerprint followed by sha256 of the text (see
``Encoder.text_hash``): one text under one model configuration has one key,
whichever row or process produced it. Counters (hits, misses, encode calls,
texts encoded, rejected values) are kept in total and per fingerprint, the
first characters of a key (hashing.fingerprint_of).

Every function here but ``delete_vectors`` degrades to "no cache" when the
cache is unreachable: losing the cache costs encoding time, never
correctness.
"""

import json
import logging
from collections import Counter

import numpy as np
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.core.exceptions import ImproperlyConfigured

from semantic.conf import semantic_settings
from semantic.hashing import fingerprint_of

logger = logging.getLogger("semantic")

KEY_PREFIX = "semantic:emb:"
QUERY_KEY_PREFIX = "semantic:query:"
STATS_PREFIX = "semantic:stats:"
STAT_NAMES = ("hits", "misses", "encode_calls", "texts_encoded", "rejected")
# Vectors travel as little-endian float32, whatever the machine's order.
VECTOR_DTYPE = np.dtype("<f4")


class RawCache:
    """A Django RedisCache alias used for raw values: its key names and its redis client, never its serializer."""

    def __init__(self, alias):
        if not is_supported(alias):
            cache = caches[alias]
            raise ImproperlyConfigured(
                f"SEMANTIC cache alias {alias!r} is a {type(cache).__module__}.{type(cache).__name__}; semantic needs "
                "django.core.cache.backends.redis.RedisCache (it stores raw bytes there, where other backends pickle), "
                "or the alias None for no cache (semantic.E014)."
            )
        self.alias = alias
        self.cache = caches[alias]

    def key(self, name):
        return self.cache.make_and_validate_key(name)

    def client(self, write=False):
        # Django's RedisCacheClient: the pool of the alias's servers (writes
        # to the first, reads spread over the others).
        return self.cache._cache.get_client(write=write)


def is_supported(alias):
    """Whether ``alias`` names a cache this module can use (a RedisCache): semantic.checks' E014."""
    return isinstance(caches[alias], RedisCache)


def get_store(queries=False):
    """The RawCache of CACHE_ALIAS (``queries``: of QUERY_CACHE_ALIAS), or None when that alias is None."""
    alias = semantic_settings.CACHE_ALIAS
    if queries and semantic_settings.QUERY_CACHE_ALIAS:
        alias = semantic_settings.QUERY_CACHE_ALIAS
    return RawCache(alias) if alias else None


def decode_vector(value, dimensions=None):
    """``value`` as a float32 vector, or None unless it is ``dimensions`` (if given) finite little-endian float32s."""
    if not isinstance(value, bytes) or not value or len(value) % VECTOR_DTYPE.itemsize:
        return None
    if dimensions and len(value) != dimensions * VECTOR_DTYPE.itemsize:
        return None
    vector = np.frombuffer(value, dtype=VECTOR_DTYPE)
    if not np.isfinite(vector).all():
        return None
    return vector.astype(np.float32, copy=False)


def encode_vector(vector):
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


def get_vectors(hashes, *, dimensions=None, queries=False):
    """Look up many row hashes at once (one MGET); returns {hash: float32 ndarray} for valid hits.

    ``queries`` looks in the query vectors' key space. Counts hits, misses
    and rejected values per fingerprint and logs them at DEBUG (rejections
    at WARNING), one line per fingerprint and call.
    """
    store = get_store(queries)
    if store is None or not hashes:
        return {}
    prefix = QUERY_KEY_PREFIX if queries else KEY_PREFIX
    try:
        values = store.client().mget([store.key(prefix + h) for h in hashes])
    except Exception:
        logger.warning("semantic: embedding cache unreachable; encoding everything", exc_info=True)
        return {}
    hits, rejected = {}, Counter()
    for h, value in zip(hashes, values):
        if value is None:
            continue
        vector = decode_vector(value, dimensions)
        if vector is None:
            rejected[fingerprint_of(h)] += 1
        else:
            hits[h] = vector
    looked_up = Counter(fingerprint_of(h) for h in hashes)
    hit = Counter(fingerprint_of(h) for h in hits)
    for fingerprint, count in sorted(looked_up.items()):
        misses = count - hit[fingerprint]
        incr_stats(fingerprint, hits=hit[fingerprint], misses=misses, rejected=rejected[fingerprint])
        logger.debug("semantic: embedding cache %s: %d hit(s), %d miss(es)", fingerprint, hit[fingerprint], misses)
        if rejected[fingerprint]:
            logger.warning(
                "semantic: embedding cache %s: ignored %d value(s) that are not %s float32 vectors (written by something else?)",
                fingerprint,
                rejected[fingerprint],
                dimensions or "whole",
            )
    return hits


def set_vectors(vectors_by_hash, *, queries=False):
    """Store {hash: vector}, each with its key space's TTL; failures are logged and ignored."""
    store = get_store(queries)
    if store is None or not vectors_by_hash:
        return
    prefix, timeout = (
        (QUERY_KEY_PREFIX, semantic_settings.QUERY_CACHE_TIMEOUT) if queries else (KEY_PREFIX, semantic_settings.CACHE_TIMEOUT)
    )
    try:
        pipeline = store.client(write=True).pipeline(transaction=False)
        for h, vector in vectors_by_hash.items():
            pipeline.set(store.key(prefix + h), encode_vector(vector), ex=timeout)
        pipeline.execute()
    except Exception:
        logger.warning("semantic: could not write the embedding cache", exc_info=True)


def delete_vectors(hashes):
    """Forget the cached (document) vectors of ``hashes``, so their texts are encoded again.

    Unlike the other functions here it raises when the cache cannot be
    reached: a caller asking to re-encode must learn that it did not happen.
    """
    store = get_store()
    keys = sorted({KEY_PREFIX + h for h in hashes})
    if store is not None and keys:
        store.client(write=True).delete(*[store.key(key) for key in keys])


# --- flags and records ----------------------------------------------------------


def add_flag(name, timeout):
    """Set key ``name`` for ``timeout`` seconds unless it exists; returns whether it was set.

    None without a cache. Raises when the cache is unreachable.
    """
    store = get_store()
    if store is None:
        return None
    return bool(store.client(write=True).set(store.key(name), b"1", nx=True, ex=timeout))


def delete_key(name):
    """Delete key ``name`` (a flag or a record); raises when the cache is unreachable."""
    store = get_store()
    if store is not None:
        store.client(write=True).delete(store.key(name))


def get_record(name):
    """The JSON object stored under ``name``, or None (absent, not JSON, no cache). Raises when unreachable."""
    store = get_store()
    if store is None:
        return None
    value = store.client().get(store.key(name))
    try:
        record = json.loads(value) if value is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def set_record(name, record, timeout):
    """Store the dict ``record`` as JSON (other values as their str) under ``name`` for ``timeout`` seconds; raises when unreachable."""
    store = get_store()
    if store is not None:
        store.client(write=True).set(store.key(name), json.dumps(record, default=str), ex=timeout)


# --- counters -------------------------------------------------------------------


def _stat_key(name, fingerprint=None):
    return f"{STATS_PREFIX}{fingerprint}:{name}" if fingerprint else STATS_PREFIX + name


def incr_stats(fingerprint=None, **deltas):
    """Add to the counters (STAT_NAMES): the totals always, with ``fingerprint`` that fingerprint's too.

    One round trip; a missing counter starts at 0 and never expires.
    Failures are logged at DEBUG and ignored.
    """
    store = get_store()
    if store is None:
        return
    scopes = [None] if fingerprint is None else [None, fingerprint]
    increments = {_stat_key(name, scope): delta for name, delta in deltas.items() if delta for scope in scopes}
    if not increments:
        return
    try:
        pipeline = store.client(write=True).pipeline(transaction=False)
        for key, delta in increments.items():
            pipeline.incrby(store.key(key), delta)
        pipeline.execute()
    except Exception:
        logger.debug("semantic: could not update stats %s", sorted(deltas), exc_info=True)


def get_stats(fingerprint=None):
    """The counters as a dict of ints (zeros when unknown or not a number): totals, or one fingerprint's."""
    stats = dict.fromkeys(STAT_NAMES, 0)
    store = get_store()
    if store is None:
        return stats
    try:
        values = store.client().mget([store.key(_stat_key(name, fingerprint)) for name in STAT_NAMES])
    except Exception:
        return stats
    for name, value in zip(STAT_NAMES, values):
        if isinstance(value, bytes) and value.isdigit():
            stats[name] = int(value)
    return stats


def reset_stats(fingerprint=None):
    """Zero the counters: the totals, or one fingerprint's."""
    store = get_store()
    if store is not None:
        store.client(write=True).delete(*[store.key(_stat_key(name, fingerprint)) for name in STAT_NAMES])
