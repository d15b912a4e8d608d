"""
The hashed-text embedding cache, plus counters, on a Django cache alias.

Keys are ``semantic:emb:<row hash>``, where the row hash is the encoder
fingerprint followed by sha256 of the text (see ``Encoder.text_hash``): one
text under one model configuration has one key, whichever row or process
produced it. Values are float32 bytes. With a Redis cache backend a lookup of
a whole batch is one MGET.

Counters (hits, misses, encode calls, texts encoded) are kept in total and
per encoder fingerprint, the first characters of a key (hashing.fingerprint_of):
after a change of model or settings, the new configuration's hit rate is not
diluted by the old one's history.

Every function here degrades to "no cache" when the cache is unreachable:
losing the cache costs encoding time, never correctness.
"""

import logging
from collections import Counter

import numpy as np
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache

from semantic.conf import semantic_settings
from semantic.hashing import fingerprint_of

logger = logging.getLogger("semantic")

KEY_PREFIX = "semantic:emb:"
STATS_PREFIX = "semantic:stats:"
STAT_NAMES = ("hits", "misses", "encode_calls", "texts_encoded")


def get_cache():
    """The configured cache, or None when CACHE_ALIAS is None."""
    alias = semantic_settings.CACHE_ALIAS
    return caches[alias] if alias else None


def get_vectors(hashes):
    """Look up many row hashes at once; returns {hash: float32 ndarray} for hits.

    Counts hits and misses per fingerprint and logs them at DEBUG, one line
    per fingerprint and call (a worker makes one call per claimed batch).
    """
    cache = get_cache()
    if cache is None or not hashes:
        return {}
    try:
        found = cache.get_many([KEY_PREFIX + h for h in hashes])
    except Exception:
        logger.warning("semantic: embedding cache unreachable; encoding everything", exc_info=True)
        return {}
    hits = {key[len(KEY_PREFIX):]: np.frombuffer(value, dtype=np.float32) for key, value in found.items()}
    looked_up = Counter(fingerprint_of(h) for h in hashes)
    hit = Counter(fingerprint_of(h) for h in hits)
    for fingerprint, count in sorted(looked_up.items()):
        misses = count - hit[fingerprint]
        incr_stats(fingerprint, hits=hit[fingerprint], misses=misses)
        logger.debug("semantic: embedding cache %s: %d hit(s), %d miss(es)", fingerprint, hit[fingerprint], misses)
    return hits


def set_vectors(vectors_by_hash):
    """Store {hash: vector}; failures are logged and ignored."""
    cache = get_cache()
    if cache is None or not vectors_by_hash:
        return
    try:
        cache.set_many(
            {KEY_PREFIX + h: np.asarray(v, dtype=np.float32).tobytes() for h, v in vectors_by_hash.items()},
            timeout=semantic_settings.CACHE_TIMEOUT,
        )
    except Exception:
        logger.warning("semantic: could not write the embedding cache", exc_info=True)


def delete_vectors(hashes):
    """Forget the cached vectors of ``hashes``, so their texts are encoded again.

    Unlike the other functions here it raises when the cache cannot be
    reached: a caller asking to re-encode must learn that it did not happen.
    """
    cache = get_cache()
    keys = sorted({KEY_PREFIX + h for h in hashes})
    if cache is not None and keys:
        cache.delete_many(keys)


def _stat_key(name, fingerprint=None):
    return f"{STATS_PREFIX}{fingerprint}:{name}" if fingerprint else STATS_PREFIX + name


def incr_stats(fingerprint=None, **deltas):
    """Add to the counters (hits, misses, encode_calls, texts_encoded).

    The totals always; with ``fingerprint``, that fingerprint's counters too.
    Failures are logged at DEBUG and ignored.
    """
    cache = get_cache()
    if cache is None:
        return
    scopes = [None] if fingerprint is None else [None, fingerprint]
    increments = {_stat_key(name, scope): delta for name, delta in deltas.items() if delta for scope in scopes}
    if not increments:
        return
    try:
        _add_to_counters(cache, increments)
    except Exception:
        logger.debug("semantic: could not update stats %s", sorted(deltas), exc_info=True)


def _add_to_counters(cache, increments):
    """Add each delta to its counter; a missing counter starts at 0 and never expires."""
    if isinstance(cache, RedisCache):
        # One round trip for all counters (a worker's batch touches four):
        # INCRBY creates a missing key, and the cache reads it back as an int.
        client = cache._cache.get_client(write=True)
        pipeline = client.pipeline(transaction=False)
        for key, delta in increments.items():
            pipeline.incrby(cache.make_and_validate_key(key), delta)
        pipeline.execute()
        return
    for key, delta in increments.items():
        # add() then incr(): incr() alone fails on a missing key.
        cache.add(key, 0, timeout=None)
        cache.incr(key, delta)


def get_stats(fingerprint=None):
    """The counters as a dict of ints (zeros when unknown): totals, or one fingerprint's."""
    cache = get_cache()
    stats = dict.fromkeys(STAT_NAMES, 0)
    if cache is None:
        return stats
    try:
        found = cache.get_many([_stat_key(name, fingerprint) for name in STAT_NAMES])
    except Exception:
        return stats
    for name in STAT_NAMES:
        stats[name] = int(found.get(_stat_key(name, fingerprint), 0))
    return stats


def reset_stats(fingerprint=None):
    """Zero the counters: the totals, or one fingerprint's."""
    cache = get_cache()
    if cache is not None:
        cache.delete_many([_stat_key(name, fingerprint) for name in STAT_NAMES])
