"""
The values the hash columns hold, and the digests they are made of.

A leaf module: it imports nothing of the app, so every other module can use it.

* A **content hash** is ``fingerprint (16 hex) + sha256(text) (first 40 hex)``.
  It names "this text under this encoder configuration": the row hashes of an
  EmbeddingField, the chunk hashes, and the keys of the embedding cache.
* A **stale mark** (``"stale:" + 32 random hex``) is written to a row's source
  hash where its new text is not known in Python (``QuerySet.update()``,
  ``mark_stale()``, ``save(update_fields=...)``, the rehash sweep). Every mark
  is new, so no writer can repeat another's: the worker's guarded write-back
  compares the source hash it read with the text against the one the row
  holds, and an edit made meanwhile always changes it.
* A **forgotten-text hash** (a vector hash of ``fingerprint + "?" + random``)
  keeps a vector and its configuration but matches no text, so the worker
  encodes the row's text again instead of confirming it (``--force``).
"""

import hashlib
import os
import uuid
from pathlib import Path

FINGERPRINT_LENGTH = 16
# Hex digits of sha256(text) kept after the fingerprint: 160 bits.
TEXT_DIGEST_LENGTH = 40
HASH_LENGTH = FINGERPRINT_LENGTH + TEXT_DIGEST_LENGTH

STALE_PREFIX = "stale:"
FORGOTTEN_SEPARATOR = "?"

# Bytes read from each end of a model file for its identity digest. The tail
# of a weights file holds trained values, so two fine-tunes of one base model
# differ there even when their sizes and headers are equal.
_IDENTITY_SAMPLE_BYTES = 64 * 1024


def clean_text(text):
    """Normalise a source text before hashing and encoding.

    NUL characters are dropped (tokenizers and PostgreSQL text both choke on
    them); surrounding whitespace is stripped, so a whitespace-only text is
    empty and gets no vector.
    """
    return text.replace("\x00", "").strip()


def fingerprint(*parts):
    """A FINGERPRINT_LENGTH hex digest of ``parts`` (strings naming a configuration)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def content_hash(fingerprint_, text):
    """``fingerprint_`` + sha256 of ``text``: the hash of this text under that configuration."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return fingerprint_ + digest[:TEXT_DIGEST_LENGTH]


def fingerprint_of(value):
    """The fingerprint a content hash (or a cache key without its prefix) begins with."""
    return value[:FINGERPRINT_LENGTH]


def new_stale_mark():
    """A source-hash value that marks a row stale and that no other mark repeats."""
    return STALE_PREFIX + uuid.uuid4().hex


def forgotten_text_suffix():
    """What follows the fingerprint in a forgotten-text vector hash (see the module docstring)."""
    return FORGOTTEN_SEPARATOR + uuid.uuid4().hex


def model_identity(location, revision=None):
    """A stable name for the model weights at ``location``.

    A local directory is identified by the names, sizes and sampled contents
    of its files, not by its absolute path, so moving a virtualenv does not
    invalidate every vector while retraining into the same folder does.
    """
    if revision:
        return f"revision:{revision}"
    root = Path(location)
    if not root.is_dir():
        return f"hub:{location}"
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_IDENTITY_SAMPLE_BYTES))
            if size > 2 * _IDENTITY_SAMPLE_BYTES:
                handle.seek(-_IDENTITY_SAMPLE_BYTES, os.SEEK_END)
                digest.update(handle.read())
    return f"files:{digest.hexdigest()}"
