"""
The ONNX encoder backend: a SentenceTransformer's transformer run by onnxruntime.

An alias with ``"backend": "onnx"`` (see semantic/conf.py) still loads its
SentenceTransformer once, on the CPU: its tokenizer, its ``max_seq_length``
and the modules after the transformer (Pooling, Dense, Normalize) are the
model's own, so tokenization, truncation and pooling are identical to the
torch backend by construction. Only the transformer's forward pass, nearly
all of the work, runs in onnxruntime; its torch weights are dropped once
the ONNX session is open.

The transformer is exported once per model (``torch.onnx.export`` with the
TorchScript exporter, ``dynamo=False``, which traces what transformers 5
runs; dynamic batch and sequence axes) into a cache directory, fused by
onnxruntime's transformer optimizer where it knows the architecture,
checked against torch's output, and for ``"quantize": "int8"`` quantized
with onnxruntime's own dynamic quantization (see INT8_RECIPE). A file's name is
a digest of the model identity and EXPORT_VERSION plus the precision, so a
changed model is exported again. Files are written to a temporary name and
renamed into place, so a process never opens half a file; a file that does
not open, or lacks the export key written into its metadata (the last bytes
of an ONNX file: a truncated file loses them), is exported again.

Leaf-like: imports hashing only, and gets everything else (identity,
threads, directory) from its caller, semantic.encoders.
"""

import logging
import os
import tempfile
import warnings
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from semantic.hashing import fingerprint

logger = logging.getLogger("semantic")

#: Bumped whenever the export or quantization recipe changes what a file
#: computes: it is part of the file key and of the encoder fingerprint, so
#: vectors made by an older recipe become stale.
EXPORT_VERSION = 1
#: onnxruntime.quantization.quantize_dynamic options of ``"int8"``. Weights
#: int8 with one scale per output channel, activations uint8 per tensor,
#: computed at run time; the fused Attention's QKV projection and the
#: MatMuls whose second input is a weight (onnxruntime's MatMulConstBOnly
#: default for dynamic quantization), so the attention products of two
#: activations stay float. One scale per tensor (per_channel False) gave a
#: mean cosine of 0.94 to torch's vectors on the BBC bodies, per channel
#: 0.99, at the same speed (BENCHMARKS.md, backends).
INT8_RECIPE = {"op_types_to_quantize": ["MatMul", "Attention"], "per_channel": True, "reduce_range": False}
#: A session run of a batch ends where a text has fewer tokens than this share
#: of the run's longest (OnnxSentenceModel._runs): the padding a run computes
#: stays under a tenth, where a batch padded to its longest text computed 13 %
#: more tokens than the worker's chunks hold (BENCHMARKS.md, backends).
RUN_LENGTH_RATIO = 0.9
#: Architectures whose export is fused by onnxruntime's transformer optimizer
#: (its "bert" fusions: Attention, EmbedLayerNormalization,
#: SkipLayerNormalization, BiasGelu): fewer, faster operators, and an int8
#: Attention. Others run unfused. Every export is checked against torch.
FUSED_MODEL_TYPES = ("bert",)
#: Metadata key holding a file's export key; checked on every open.
METADATA_KEY = "semantic_export"
ONNX_OPSET = 17
#: What the exported graph takes (those the tokenizer makes) and returns.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "token_embeddings"
#: Modules that may follow the transformer: they run as the model's own
#: torch modules on the token embeddings onnxruntime returns. Anything else (a Router, CLIP, a
#: layer-weighted pooling that needs every hidden state) is refused.
HEAD_MODULES = ("Pooling", "Dense", "Normalize")


def export_key(identity, quantize):
    """The name of one exported file: model identity + recipe version + precision."""
    return f"{fingerprint(identity, f'onnx-export=v{EXPORT_VERSION}')}-{quantize or 'fp32'}"


def user_cache_dir():
    """Where exports go when nothing else is writable: $XDG_CACHE_HOME/semantic/onnx (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "semantic" / "onnx"


def export_directory(location, configured=None, key=None):
    """The directory that holds (or will hold) a model's ONNX files.

    ``configured`` (the alias's ``onnx_dir``) wins. Otherwise a folder next
    to a local model directory, ``<model dir>-onnx`` (a sibling, never
    inside: the model identity digests every file in the model directory),
    when it already holds the file ``key`` or can be written; otherwise
    user_cache_dir().
    """
    if configured:
        return Path(configured).expanduser()
    model_dir = Path(location)
    if model_dir.is_dir():
        beside = model_dir.with_name(model_dir.name + "-onnx")
        if key and (beside / f"{key}.onnx").is_file():
            return beside
        if writable(beside):
            return beside
    return user_cache_dir()


def writable(directory):
    """Whether files can be created in ``directory``, or it can be created (in an existing parent)."""
    directory = Path(directory)
    if directory.exists():
        return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)
    parent = directory.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def unsupported_modules(location):
    """Why the model files at ``location`` cannot run on this backend, or None. Reads modules.json only."""
    import json

    modules_file = Path(location) / "modules.json"
    if not modules_file.is_file():
        return None  # a hub id or a plain transformers folder: decided when the model loads
    try:
        names = [entry["type"].rsplit(".", 1)[-1] for entry in json.loads(modules_file.read_text())]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{modules_file} cannot be read: {exc}"
    return _module_problem(names)


def _module_problem(names):
    if not names or names[0] != "Transformer":
        return f"its first module is {names[0] if names else 'missing'}, not a Transformer"
    others = [name for name in names[1:] if name not in HEAD_MODULES]
    if others:
        return f"it has module(s) {', '.join(others)}; the onnx backend runs {', '.join(HEAD_MODULES)} after the transformer"
    return None


class OnnxSentenceModel:
    """A SentenceTransformer whose transformer runs in onnxruntime.

    It offers what semantic uses of a SentenceTransformer: ``encode()``
    (with the same keyword arguments and float32 output), ``tokenizer``,
    ``max_seq_length``, ``device`` ("cpu") and ``get_embedding_dimension()``,
    so the Encoder, the Chunker and the worker need no branch per backend.
    """

    device = "cpu"

    def __init__(self, sentence_transformer, session, input_names, path=None):
        self.sentence_transformer = sentence_transformer
        self.session = session
        self.input_names = input_names
        #: The ONNX file the session runs.
        self.path = path
        self.head = list(sentence_transformer)[1:]
        model = sentence_transformer
        # What SentenceTransformer.encode prepends when no prompt is passed.
        self.prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None

    @property
    def tokenizer(self):
        return self.sentence_transformer.tokenizer

    @property
    def max_seq_length(self):
        return self.sentence_transformer.max_seq_length

    def get_embedding_dimension(self):
        return self.sentence_transformer.get_embedding_dimension()

    def encode(self, sentences, batch_size=32, normalize_embeddings=False, convert_to_numpy=True, show_progress_bar=False):
        """One float32 row per sentence, as SentenceTransformer.encode(..., convert_to_numpy=True) returns."""
        import numpy as np
        import torch

        vectors = np.empty((len(sentences), self.get_embedding_dimension()), dtype=np.float32)
        # Longest first, as SentenceTransformer.encode: texts of one batch have
        # similar lengths, so little of a batch is padding.
        order = np.argsort([-len(sentence) for sentence in sentences], kind="stable")
        for start in range(0, len(sentences), max(1, batch_size)):
            batch = order[start : start + batch_size]
            features = self.sentence_transformer.preprocess([sentences[i] for i in batch], prompt=self.prompt)
            for rows, width in self._runs(features):
                part = {name: _rows(value, rows, width) for name, value in features.items()}
                (token_embeddings,) = self.session.run([OUTPUT_NAME], {name: part[name].numpy() for name in self.input_names})
                part[OUTPUT_NAME] = torch.from_numpy(token_embeddings)
                with torch.inference_mode():
                    for module in self.head:
                        part = module(part)
                    embeddings = part["sentence_embedding"]
                    if normalize_embeddings:
                        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
                vectors[batch[rows]] = embeddings.numpy()
        return vectors

    def _runs(self, features):
        """The session runs of one tokenized batch: ``(rows, width)`` pairs, rows longest first.

        Characters only approximate tokens, so a batch sorted by characters
        still pads its shorter texts to its longest. A run ends where a text
        is shorter than RUN_LENGTH_RATIO of the run's first, and is cut to its
        own longest text: all of the transformer's work, the quadratic attention
        above all, is spent on padding otherwise. Right-padded batches only
        (a left-padded tokenizer's batch runs whole).
        """
        import numpy as np

        lengths = features["attention_mask"].sum(dim=1).numpy()
        width = features["attention_mask"].shape[1]
        if self.tokenizer.padding_side != "right":
            return [(np.arange(len(lengths)), width)]
        order = np.argsort(-lengths, kind="stable")
        runs, first = [], 0
        for index in range(1, len(order) + 1):
            if index == len(order) or lengths[order[index]] < RUN_LENGTH_RATIO * lengths[order[first]]:
                runs.append((order[first:index], int(lengths[order[first]])))
                first = index
        return runs


def _rows(value, rows, width):
    """``rows`` of one tokenized feature, its token axis cut to ``width``; non-tensor features as they are."""
    if not hasattr(value, "dim"):
        return value
    value = value[rows]
    return value[:, :width] if value.dim() == 2 else value


def load(sentence_transformer, *, identity, quantize, directory, threads, alias):
    """An OnnxSentenceModel for a SentenceTransformer loaded on the CPU in float32.

    Exports (and quantizes) the transformer into ``directory`` unless a valid
    file is there, opens it with ``threads`` intra-op threads (None:
    onnxruntime's default, one per core), and frees the torch weights of
    the transformer. ImproperlyConfigured when the model has modules this
    backend cannot run.
    """
    transformer = _check_supported(sentence_transformer, alias)
    input_names = _input_names(sentence_transformer, transformer)
    key = export_key(identity, quantize)
    path = Path(directory) / f"{key}.onnx"
    session = _open(path, key, threads)
    if session is None:
        try:
            _export(sentence_transformer, transformer, input_names, identity, quantize, Path(directory))
        except ImproperlyConfigured:
            raise
        except Exception as exc:  # the exporter's and quantizer's errors have no common type
            raise ImproperlyConfigured(
                f"Model alias {alias!r} could not be exported to ONNX in {directory}: {type(exc).__name__}: {exc}. "
                "Use 'backend': 'torch' for it, or set 'onnx_dir' to a writable directory."
            ) from exc
        session = _open(path, key, threads)
        if session is None:
            raise ImproperlyConfigured(f"The ONNX export of model alias {alias!r} at {path} does not open.")
    # The session has the weights now; keep the module's structure (config,
    # tokenizer) and free its parameters.
    _transformer_module(transformer).to("meta")
    logger.info("Semantic model %r runs on onnxruntime from %s", alias, path)
    return OnnxSentenceModel(sentence_transformer, session, input_names, path)


def _transformer_module(transformer):
    return getattr(transformer, "auto_model", None) or transformer.model


def _check_supported(model, alias):
    """The model's Transformer module; ImproperlyConfigured when the model cannot run here."""
    modules = list(model)
    problem = _module_problem([type(module).__name__ for module in modules])
    if problem is None:
        transformer = modules[0]
        text = getattr(transformer, "modality_config", {}).get("text", {})
        output = text.get("method_output_name")
        if text.get("method") != "forward" or output not in ("last_hidden_state", ("last_hidden_state",), ["last_hidden_state"]):
            problem = f"its transformer gives {output!r} through {text.get('method')!r}, not the last hidden state"
        elif getattr(transformer, "module_output_name", OUTPUT_NAME) != OUTPUT_NAME:
            problem = f"its transformer outputs {transformer.module_output_name!r}, not token embeddings"
        elif getattr(_transformer_module(transformer).config, "output_hidden_states", False):
            problem = "its transformer outputs every hidden state"
    if problem:
        raise ImproperlyConfigured(
            f"Model alias {alias!r} cannot run on the onnx backend: {problem}. Use 'backend': 'torch' for it."
        )
    return modules[0]


def _input_names(model, transformer):
    """The tokenizer outputs the transformer takes, in the order of INPUT_NAMES."""
    import inspect

    features = model.preprocess(["a", "a b"])
    accepted = inspect.signature(_transformer_module(transformer).forward).parameters
    return [name for name in INPUT_NAMES if name in features and name in accepted]


def _open(path, key, threads):
    """An InferenceSession on ``path``, or None when it is missing, unreadable, or not this export."""
    import onnxruntime

    if not path.is_file():
        return None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    # Threads that spin between operators take the CPU from whatever shares
    # the cores (web processes, PostgreSQL, torch): measured on two busy
    # cores, a query took 10 ms spinning and 4 ms without.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        logger.warning("semantic: %s does not open (%s); exporting it again", path, str(exc)[:200])
        return None
    if session.get_modelmeta().custom_metadata_map.get(METADATA_KEY) != key:
        logger.warning("semantic: %s is not a complete export of this model; exporting it again", path)
        return None
    return session


def _export(model, transformer, input_names, identity, quantize, directory):
    """Write the float32 export (and the quantized one when asked) into ``directory``, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    fp32_key = export_key(identity, None)
    fp32_path = directory / f"{fp32_key}.onnx"
    if _open(fp32_path, fp32_key, 1) is None:
        with _temporary(directory) as raw, _temporary(directory) as fused:
            features, expected = _torch_export(model, transformer, input_names, raw)
            source = raw
            if _fusable(transformer):
                source = _fuse(raw, fused, _transformer_module(transformer).config)
            _verify(source, features, expected, input_names)
            _publish(source, fp32_key, fp32_path)
    if quantize == "int8":
        from onnxruntime.quantization import quantize_dynamic

        key = export_key(identity, quantize)
        with _temporary(directory) as quantized:
            quantize_dynamic(str(fp32_path), str(quantized), **int8_options())
            _publish(quantized, key, directory / f"{key}.onnx")


def int8_options(**changes):
    """The keyword arguments of quantize_dynamic for ``"int8"`` (INT8_RECIPE), with ``changes``."""
    import onnx
    from onnxruntime.quantization import QuantType

    # The fused operators (com.microsoft) have no ONNX shape inference; their
    # outputs are float, which the quantizer needs to be told.
    options = {**INT8_RECIPE, "weight_type": QuantType.QInt8, "extra_options": {"DefaultTensorType": onnx.TensorProto.FLOAT}}
    return {**options, **changes}


def _fusable(transformer):
    """Whether onnxruntime's transformer optimizer has fusions for this architecture (BERT's, tested here)."""
    return getattr(_transformer_module(transformer).config, "model_type", None) in FUSED_MODEL_TYPES


def _fuse(source, target, config):
    """``source`` with onnxruntime's BERT fusions (Attention, EmbedLayerNormalization, ...), written to ``target``."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(source), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    optimized.save_model_to_file(str(target))
    return target


def _verify(path, features, expected, input_names):
    """ImproperlyConfigured unless the file at ``path`` computes what the torch module computed."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {name: features[name].numpy() for name in input_names})
    error = float(np.max(np.abs(actual - expected)))
    if not error <= 1e-3 * max(1.0, float(np.max(np.abs(expected)))):
        raise ImproperlyConfigured(
            f"The ONNX export differs from the torch model by up to {error:.2g} on an example batch; "
            "use 'backend': 'torch' for this model."
        )


def _torch_export(model, transformer, input_names, target):
    """Export the transformer to ``target``; returns the example features and torch's output for them."""
    import torch

    inner = _transformer_module(transformer)
    module = _token_embeddings(inner, input_names)
    # Two texts of different lengths: the traced graph then handles padding.
    features = model.preprocess(["an example", "a longer example sentence to export the model with"])
    axes = {0: "batch", 1: "sequence"}
    # Eager attention: plain MatMul and Softmax nodes, which onnxruntime's
    # optimizer fuses into its Attention operator (SDPA's export it does not
    # recognise). Restored afterwards.
    previous = getattr(inner.config, "_attn_implementation", None)
    if previous and previous != "eager" and hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation("eager")
    # Worker logs need none of the exporter's notes: the tracer's about Python
    # branches on shapes in transformers' mask code (a padded example batch
    # takes the general branch), and the TorchScript exporter's deprecation,
    # chosen on purpose (see the module docstring).
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
            inputs = {name: features[name] for name in input_names}
            torch.onnx.export(
                module,
                (),
                str(target),
                kwargs=inputs,
                input_names=list(input_names),
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: axes for name in (*input_names, OUTPUT_NAME)},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
            expected = module(**inputs).numpy()
    finally:
        if previous and previous != "eager" and hasattr(inner, "set_attn_implementation"):
            inner.set_attn_implementation(previous)
    return features, expected


def _publish(source, key, target):
    """Stamp ``source`` with its export key and rename it to ``target`` (atomic on one file system)."""
    import onnx

    graph = onnx.load(str(source))
    del graph.metadata_props[:]
    onnx.helper.set_model_props(graph, {METADATA_KEY: key})
    # Saved beside the source, then renamed: readers see the old file or the new, never a mix.
    stamped = source.with_suffix(".stamped")
    try:
        onnx.save(graph, str(stamped))
        os.replace(stamped, target)
    finally:
        stamped.unlink(missing_ok=True)


class _temporary:
    """A temporary file name in ``directory`` (removed afterwards, whatever happened)."""

    def __init__(self, directory):
        self.directory = directory

    def __enter__(self):
        handle, name = tempfile.mkstemp(dir=self.directory, prefix=".export-", suffix=".onnx")
        os.close(handle)
        self.path = Path(name)
        return self.path

    def __exit__(self, *exc_info):
        self.path.unlink(missing_ok=True)


def _token_embeddings(model, input_names):
    """``model`` as a module that takes the tokenizer's outputs and returns the last hidden state.

    It calls the transformer with keyword arguments: transformers 5 changed
    the positional order of BERT's forward. Defined here, on first use, so
    that importing this module does not import torch.
    """
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{name: given[name] for name in input_names}, return_dict=True).last_hidden_state

    return TokenEmbeddings().eval()
