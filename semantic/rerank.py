"""
Two-stage search: a cross-encoder re-scores the candidates of a vector search.

A bi-encoder (``encoders``) embeds query and document separately, which is
what makes an index possible; a cross-encoder reads the query and one
document together and scores their relevance, which is more accurate but
costs a forward pass per (query, document) pair. So the vector search finds
``RERANK_CANDIDATES`` rows cheaply and the cross-encoder orders only those.

Configuration, ``settings.SEMANTIC["RERANKER"]``:

* ``None`` (the default): reranking is off;
* a string: a local directory holding a sentence-transformers CrossEncoder;
* a dict with exactly one of ``"path"`` (a local directory, or a hub id where
  the hub is reachable) and ``"package"`` (an installed package carrying the
  model in its ``model`` folder, as in ``MODELS``), and optionally
  ``"max_length"`` (tokens per pair; None keeps the model's own limit),
  ``"batch_size"`` (pairs per forward pass; None uses ``BATCH_SIZE``) and
  ``"revision"`` (a hub revision; also names the model's identity).

The model loads on the device ``DEVICE`` names (resolved like the encoders':
"auto" picks CUDA, then MPS, then the CPU) and runs in fp16 on CUDA when
``CUDA_FP16`` is set. One Reranker per configuration is kept per process;
a change of ``SEMANTIC`` (``override_settings``) drops them.
"""

import logging
import os
import threading
from functools import cached_property
from operator import itemgetter
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from semantic.conf import SETTING_NAME, semantic_settings
from semantic.encoders import (
    apply_torch_threads,
    batch_size_for,
    encode_with_backoff,
    model_location,
    release_accelerator_memory,
    resolve_device,
    use_half_precision,
)
from semantic.hashing import clean_text, model_identity

logger = logging.getLogger("semantic")

SETTING = f"settings.{SETTING_NAME}['RERANKER']"

RERANKER_DEFAULTS = {
    "path": None,
    "package": None,
    "max_length": None,
    "batch_size": None,
    "revision": None,
}

# The score given to a candidate that could not be scored even alone because
# the device ran out of memory: it ranks after every scored candidate.
UNSCORED = float("-inf")


def is_reranking_configured():
    """Whether ``SEMANTIC["RERANKER"]`` is set (loads nothing, validates nothing)."""
    return semantic_settings.RERANKER is not None


def reranker_config(setting=None):
    """The RERANKER setting as a dict with every key of RERANKER_DEFAULTS.

    ``setting`` defaults to ``SEMANTIC["RERANKER"]``. Raises
    ImproperlyConfigured when it is None (reranking is off) or malformed.
    """
    setting = semantic_settings.RERANKER if setting is None else setting
    if setting is None:
        raise ImproperlyConfigured(
            f"Reranking is off: {SETTING} is None. Set it to the directory of a "
            f"sentence-transformers CrossEncoder, or to a dict with 'path' or 'package'."
        )
    if isinstance(setting, (str, os.PathLike)):
        setting = {"path": setting}
    if not isinstance(setting, dict):
        raise ImproperlyConfigured(
            f"{SETTING} must be None, a model directory or a dict, not {type(setting).__name__}."
        )
    unknown = set(setting) - set(RERANKER_DEFAULTS)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown key(s) in {SETTING}: {', '.join(sorted(unknown))}. "
            f"Known keys: {', '.join(RERANKER_DEFAULTS)}."
        )
    config = {**RERANKER_DEFAULTS, **setting}
    if bool(config["path"]) == bool(config["package"]):
        raise ImproperlyConfigured(
            f"{SETTING} needs exactly one of 'path' (a local CrossEncoder directory) "
            f"or 'package' (an installed package carrying the model)."
        )
    if config["path"]:
        config["path"] = str(config["path"])
    for key in ("max_length", "batch_size"):
        value = config[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ImproperlyConfigured(
                f"{SETTING}[{key!r}] must be a positive int or None, not {value!r}."
            )
    return config


class Reranker:
    """A loaded CrossEncoder that scores (query, text) pairs.

    Built by get_reranker(); the model is loaded by the constructor, so an
    instance always works. ``config`` is a reranker_config() dict and
    ``device`` a torch device string.
    """

    def __init__(self, config, device):
        self.config = config
        self.device = device
        self.location = model_location(config)
        self.model = self._load()

    @cached_property
    def identity(self):
        """A stable name of the weights (see hashing.model_identity)."""
        return model_identity(self.location, self.config["revision"])

    @property
    def batch_size(self):
        """Pairs per forward pass: the configured ``batch_size``, else ``BATCH_SIZE`` for the device."""
        return self.config["batch_size"] or batch_size_for(self.device)

    def _load(self):
        from sentence_transformers import CrossEncoder
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        apply_torch_threads()
        logger.info("Loading semantic reranker from %s on %s", self.location, self.device)
        try:
            model = CrossEncoder(
                self.location,
                device=self.device,
                max_length=self.config["max_length"],
                revision=self.config["revision"] if not Path(self.location).is_dir() else None,
            )
        except (OSError, ValueError) as exc:
            # OSError: a missing directory, or a hub id that cannot be fetched
            # (offline); ValueError: a string that is no valid hub id either.
            raise ImproperlyConfigured(
                f"Cannot load the reranker of {SETTING} from {self.location!r}: {exc}"
            ) from exc
        if model.num_labels != 1:
            raise ImproperlyConfigured(
                f"The reranker of {SETTING} ({self.location!r}) outputs {model.num_labels} "
                f"labels per pair; reranking needs a model with one relevance score (num_labels=1)."
            )
        if use_half_precision(self.device):
            model.half()
        return model

    def score(self, query, texts):
        """One relevance score per text, in the order of ``texts``; higher is more relevant.

        The query and texts are cleaned with hashing.clean_text, and each
        (query, text) pair goes through ``CrossEncoder.predict`` with the
        model's own activation (sigmoid for a one-label model unless the
        saved model names another), ``batch_size`` pairs per forward pass.
        On an out-of-memory error the batch is halved and retried (see
        encoders.encode_with_backoff); a pair that does not fit even alone,
        or fails with an error of its own, scores UNSCORED (-inf). No
        texts: [].
        """
        query = clean_text(query)
        pairs = [(query, clean_text(text)) for text in texts]
        if not pairs:
            return []
        # Longest first, so each forward pass holds texts of similar length
        # (little padding), as predict() itself does within one call.
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1]))

        def run(batch, size):
            return self.model.predict(
                batch, batch_size=size, show_progress_bar=False, convert_to_numpy=True
            )

        sorted_scores, failed = encode_with_backoff(
            run,
            [pairs[i] for i in order],
            self.batch_size,
            on_out_of_memory=release_accelerator_memory,
        )
        if failed:
            logger.warning(
                "semantic: %d rerank candidate(s) could not be scored (%s); they rank last", len(failed), next(iter(failed.values()))
            )
        scores = [UNSCORED] * len(pairs)
        for position, index in enumerate(order):
            if sorted_scores[position] is not None:
                scores[index] = float(sorted_scores[position])
        return scores

    def rerank(self, query, candidates, text_of, top_k=None):
        """The candidates as ``[(candidate, score), ...]``, most relevant first.

        ``candidates`` is any iterable (model instances, dicts, ...);
        ``text_of(candidate)`` gives the text the cross-encoder reads (None
        counts as empty). Scores are those of score(). Candidates with equal
        scores keep their input order (the sort is stable), so the vector
        search's order breaks ties. ``top_k`` keeps only the first k (None:
        all). No candidates: [].
        """
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be None or >= 0, not {top_k!r}")
        candidates = list(candidates)
        if not candidates or top_k == 0:
            return []
        scores = self.score(query, [text_of(candidate) or "" for candidate in candidates])
        ranked = sorted(zip(candidates, scores), key=itemgetter(1), reverse=True)
        return ranked if top_k is None else ranked[:top_k]


_rerankers = {}
_rerankers_lock = threading.Lock()


def get_reranker():
    """The process-wide Reranker for the current settings, loaded on first call.

    Raises ImproperlyConfigured when ``SEMANTIC["RERANKER"]`` is None or
    malformed, or when its model cannot be loaded (a missing directory, a
    package that is not installed, a hub id while offline). A failed load is
    not remembered: the next call tries again.
    """
    config = reranker_config()
    device = resolve_device(semantic_settings.DEVICE)
    key = (tuple(sorted(config.items())), device, use_half_precision(device))
    reranker = _rerankers.get(key)
    if reranker is None:
        with _rerankers_lock:
            reranker = _rerankers.get(key)
            if reranker is None:
                reranker = _rerankers[key] = Reranker(config, device)
    return reranker


def clear_rerankers():
    """Forget every loaded Reranker (after a settings change)."""
    with _rerankers_lock:
        _rerankers.clear()


def _clear_on_settings_change(*, setting, **kwargs):
    if setting == SETTING_NAME:
        clear_rerankers()


setting_changed.connect(_clear_on_settings_change)
