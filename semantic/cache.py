"""
The hashed-text embedding cache, plus counters, on a Django cache alias.

Keys are ``semantic:emb:<row hash>``, where the row hash is the encoder
fingerprint followed by sha256 of the text (see ``Encoder.text_hash``): one
text under one model configuration has one key, whichever row or process
produced it. Values are float32 bytes. With a Redis cache backend a lookup of
a whole batch is one MGET.

Every function here degrades to "no cache" when the cache is unreachable:
losing the cache costs encoding time, never correctness.
"""

import logging

import numpy as np
from django.core.cache import caches

from semantic.conf import semantic_settings

logger = logging.getLogger("semantic")

KEY_PREFIX = "semantic:emb:"
STATS_PREFIX = "semantic:stats:"
STAT_NAMES = ("hits", "misses", "encode_calls", "texts_encoded")


def get_cache():
    """The configured cache, or None when CACHE_ALIAS is None."""
    alias = semantic_settings.CACHE_ALIAS
    return caches[alias] if alias else None


def get_vectors(hashes):
    """Look up many row hashes at once; returns {hash: float32 ndarray} for hits."""
    cache = get_cache()
    if cache is None or not hashes:
        return {}
    try:
        found = cache.get_many([KEY_PREFIX + h for h in hashes])
    except Exception:
        logger.warning("semantic: embedding cache unreachable; encoding everything", exc_info=True)
        return {}
    hits = {key[len(KEY_PREFIX):]: np.frombuffer(value, dtype=np.float32) for key, value in found.items()}
    incr_stats(hits=len(hits), misses=len(hashes) - len(hits))
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


def incr_stats(**deltas):
    """Add to the shared counters (hits, misses, encode_calls, texts_encoded)."""
    cache = get_cache()
    if cache is None:
        return
    for name, delta in deltas.items():
        if not delta:
            continue
        key = STATS_PREFIX + name
        try:
            # add() then incr(): incr() alone fails on a missing key.
            cache.add(key, 0, timeout=None)
            cache.incr(key, delta)
        except Exception:
            logger.debug("semantic: could not update stat %s", name, exc_info=True)


def get_stats():
    """Current counters as a dict of ints (zeros when unknown)."""
    cache = get_cache()
    stats = dict.fromkeys(STAT_NAMES, 0)
    if cache is None:
        return stats
    try:
        found = cache.get_many([STATS_PREFIX + name for name in STAT_NAMES])
    except Exception:
        return stats
    for name in STAT_NAMES:
        stats[name] = int(found.get(STATS_PREFIX + name, 0))
    return stats


def reset_stats():
    cache = get_cache()
    if cache is not None:
        cache.delete_many([STATS_PREFIX + name for name in STAT_NAMES])
