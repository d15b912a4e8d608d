"""
Encoders: one SentenceTransformer per alias and process, loaded on first use.

The alias's ``backend`` decides what runs it: torch (sentence-transformers on
DEVICE), or onnx (semantic.onnx_backend: the same SentenceTransformer's
tokenizer and pooling around its transformer exported to onnxruntime). Both
give ``Encoder.model`` the same interface, so queries and documents of an
alias always go through the same backend.

An encoder's *fingerprint* names everything that changes its vectors (model
identity, prefix, normalisation, max_seq_length, and a backend other than
torch with its precision). It is computed from the
settings and a cheap digest of the model files (semantic.hashing), without
loading the model, so web processes can hash texts on save at no cost.
Stored hashes and cache keys begin with it: a vector made by another model or
configuration is never mistaken for a fresh one.
"""

import logging
import threading
from functools import cached_property
from importlib import resources
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from semantic import cache
from semantic.conf import SETTING_NAME, semantic_settings
from semantic.hashing import content_hash, fingerprint, model_identity

logger = logging.getLogger("semantic")

# Longest error message kept per failed text (they end up in a column).
ERROR_MESSAGE_LENGTH = 500


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
    texts. A batch that fails with any other error is retried text by text,
    so that one bad text (a tokenizer error, say) fails alone while the rest
    are encoded; when every text of that batch fails alone too, the error is
    the encoder's, not the texts', and it is raised. Returns ``(vectors,
    failures)``: ``vectors`` has None where a text failed, and ``failures``
    maps each failed text's index to a short message.
    """
    vectors = [None] * len(texts)
    failures = {}
    position = 0
    size = max(1, batch_size)
    # After a batch failed with another error: its texts, to encode one by one.
    singles = None
    while position < len(texts):
        step = 1 if singles else size
        chunk = texts[position : position + step]
        try:
            encoded = encode(chunk, step)
        except Exception as exc:
            if is_out_of_memory(exc):
                if on_out_of_memory is not None:
                    on_out_of_memory()
                if step > 1:
                    size = step // 2
                    logger.warning("semantic: out of memory; retrying with batch size %d", size)
                    continue
                message = "out of memory even alone"
            elif step > 1:
                singles = range(position, position + len(chunk))
                continue
            elif singles and position == singles[-1] and len(singles) > 1 and all(i in failures for i in singles[:-1]):
                raise  # every text of the batch fails: the encoder is broken
            else:
                message = f"{type(exc).__name__}: {exc}"
            logger.error("semantic: a text of %d characters could not be encoded: %s", len(str(chunk[0])), message)
            failures[position] = message[:ERROR_MESSAGE_LENGTH]
        else:
            vectors[position : position + len(chunk)] = list(encoded)
        position += len(chunk)
        if singles and position > singles[-1]:
            singles = None
    return vectors, failures


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
        return fingerprint(
            self.identity,
            f"prefix={prefix!r}",
            f"normalize={bool(self.config['normalize'])}",
            f"max_seq_length={self.config['max_seq_length']}",
            *self._backend_parts(),
        )

    def _backend_parts(self):
        """What the backend adds to the fingerprint: nothing for torch, so rows embedded
        before backends existed stay fresh; backend, precision and export recipe otherwise."""
        if self.config["backend"] == "torch":
            return ()
        from semantic.onnx_backend import EXPORT_VERSION

        return (
            f"backend={self.config['backend']}",
            f"quantize={self.config['quantize']}",
            f"export=v{EXPORT_VERSION}",
        )

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
        return content_hash(self.query_fingerprint if query else self.fingerprint, text)

    @property
    def device(self):
        """The torch device the model loads on (the onnx backend always runs on the CPU)."""
        if self.config["backend"] == "onnx":
            return "cpu"
        return resolve_device(semantic_settings.DEVICE)

    @property
    def is_loaded(self):
        return self._model is not None

    @property
    def model(self):
        """The SentenceTransformer, loaded once per process (thread-safe).

        For the onnx backend an OnnxSentenceModel, which offers the same
        ``encode()``, ``tokenizer``, ``max_seq_length``, ``device`` and
        ``get_embedding_dimension()``.
        """
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
        if self.config["backend"] == "onnx":
            model = self._onnx_model(model)
        elif use_half_precision(device):
            model.half()
        actual = model.get_embedding_dimension()
        declared = self.config["dimensions"]
        if declared is not None and declared != actual:
            raise ImproperlyConfigured(
                f"Semantic model {self.alias!r} makes {actual}-dimensional vectors, "
                f"but settings declare 'dimensions': {declared}."
            )
        return model

    def _onnx_model(self, sentence_transformer):
        """The alias's model on onnxruntime (semantic.onnx_backend), exported on first use."""
        from semantic import onnx_backend

        directory = onnx_backend.export_directory(
            self.location, self.config["onnx_dir"], onnx_backend.export_key(self.identity, self.config["quantize"])
        )
        return onnx_backend.load(
            sentence_transformer,
            identity=self.identity,
            quantize=self.config["quantize"],
            directory=directory,
            # The same thread count as torch, so the backends compare fairly.
            threads=semantic_settings.TORCH_THREADS,
            alias=self.alias,
        )

    def encode(self, texts, *, query=False, batch_size=None):
        """Encode cleaned texts; returns ``(vectors, failures)``.

        ``vectors`` holds one float32 array per text, None for a text that
        could not be encoded (out of memory even alone, or an error of its
        own); ``failures`` maps those texts' indices to a message (see
        encode_with_backoff).
        """
        prefix = self.config["query_prefix" if query else "document_prefix"]
        stats_fingerprint = self.query_fingerprint if query else self.fingerprint
        model = self.model
        device = str(model.device)

        def run(batch, size):
            cache.incr_stats(stats_fingerprint, encode_calls=1)
            return model.encode(
                [prefix + text for text in batch],
                batch_size=size,
                normalize_embeddings=bool(self.config["normalize"]),
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype("float32", copy=False)

        vectors, failures = encode_with_backoff(
            run,
            texts,
            batch_size or batch_size_for(device),
            on_out_of_memory=release_accelerator_memory,
        )
        cache.incr_stats(stats_fingerprint, texts_encoded=len(texts) - len(failures))
        return vectors, failures


def release_accelerator_memory():
    """Return cached accelerator memory to the device after an out-of-memory error."""
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


def _settings_changed(*, setting, **kwargs):
    # Encoders are built from the settings; drop the ones built from the old
    # values so a changed alias takes effect.
    if setting == SETTING_NAME:
        clear_encoders()


setting_changed.connect(_settings_changed)
