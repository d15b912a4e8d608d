"""Encoder backends: the onnx backend gives torch's vectors, its exports are reused and never half read,
and the fingerprint names the backend (but not torch's, so rows embedded before backends stay fresh)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from semantic import onnx_backend
from semantic.checks import check_backends
from semantic.chunking import Chunker
from semantic.conf import semantic_settings
from semantic.encoders import Encoder, clear_encoders, get_encoder
from semantic.hashing import fingerprint

TEXTS = [
    "The central bank raised interest rates again.",
    "A striker scored twice in the cup final.",
    "New phones sold well over the holidays, the company said, while tablet sales fell.",
]


def tiny(**extra):
    return {"path": str(settings.TINY_MODEL_DIR), "dimensions": settings.TINY_DIMENSIONS, **extra}


def models_setting(**aliases):
    """SEMANTIC with ``aliases`` added to the test models."""
    return {**settings.SEMANTIC, "MODELS": {**settings.SEMANTIC["MODELS"], **aliases}}


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def encode(alias, texts, query=False):
    vectors, failures = get_encoder(alias).encode(texts, query=query)
    assert failures == {}
    return np.stack(vectors)


@pytest.fixture
def onnx_dir(tmp_path):
    return tmp_path / "onnx"


@pytest.fixture
def onnx_models(onnx_dir):
    """Torch and onnx aliases of the tiny model with prefixes, and a 16-token pair; exports in ``onnx_dir``."""
    prefixes = {"query_prefix": "query: ", "document_prefix": "passage: "}
    setting = models_setting(
        torch_prefixed=tiny(**prefixes),
        onnx_prefixed=tiny(backend="onnx", onnx_dir=str(onnx_dir), **prefixes),
        torch_short=tiny(max_seq_length=16),
        onnx_short=tiny(backend="onnx", onnx_dir=str(onnx_dir), max_seq_length=16),
        onnx_int8=tiny(backend="onnx", quantize="int8", onnx_dir=str(onnx_dir)),
    )
    with override_settings(SEMANTIC=setting):
        yield onnx_dir


# --- settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"backend": "tensorflow"}, "['backend'] is 'tensorflow'; it must be one of 'torch', 'onnx'"),
        ({"quantize": "int8"}, "['quantize'] applies to the onnx backend only"),
        ({"backend": "torch", "onnx_dir": "/tmp/x"}, "['onnx_dir'] applies to the onnx backend only"),
        ({"backend": "onnx", "quantize": "int4"}, "['quantize'] is 'int4'; it must be None (float32) or 'int8'"),
    ],
)
def test_backend_settings_are_validated(entry, fragment):
    with override_settings(SEMANTIC=models_setting(broken=tiny(**entry))):
        with pytest.raises(ImproperlyConfigured) as raised:
            semantic_settings.model_config("broken")
    assert "['MODELS']['broken']" in str(raised.value) and fragment in str(raised.value)


def test_the_onnx_backend_without_onnxruntime_installed_is_a_configuration_error(monkeypatch):
    # None in sys.modules is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with override_settings(SEMANTIC=models_setting(fast=tiny(backend="onnx"))):
        with pytest.raises(ImproperlyConfigured, match="uses the onnx backend, but onnxruntime is not installed"):
            semantic_settings.model_config("fast")
        assert semantic_settings.model_config("tiny")["backend"] == "torch"


def test_the_defaults_are_torch_in_float32():
    config = semantic_settings.model_config("tiny")
    assert (config["backend"], config["quantize"], config["onnx_dir"]) == ("torch", None, None)


# --- fingerprints ---------------------------------------------------------------------


def test_the_fingerprint_names_backend_and_precision_but_torch_keeps_the_one_it_had(onnx_models):
    torch_encoder = Encoder("torch_prefixed")
    # The fingerprint as it was computed before backends existed: rows stored then stay fresh.
    before = fingerprint(
        torch_encoder.identity, "prefix='passage: '", "normalize=True", "max_seq_length=None"
    )
    assert torch_encoder.fingerprint == before
    assert Encoder("tiny").fingerprint == fingerprint(Encoder("tiny").identity, "prefix=''", "normalize=True", "max_seq_length=None")
    documents = {alias: Encoder(alias).fingerprint for alias in ("tiny", "onnx_short", "torch_short", "onnx_int8")}
    queries = {alias: Encoder(alias).query_fingerprint for alias in ("torch_prefixed", "onnx_prefixed")}
    assert len(set(documents.values())) == 4
    assert len(set(queries.values())) == 2
    assert Encoder("onnx_prefixed").fingerprint != before
    # Computed from settings and files: nothing was loaded or exported.
    assert not get_encoder("onnx_int8").is_loaded and not onnx_models.exists()


# --- where exports go -------------------------------------------------------------------


def test_exports_go_to_onnx_dir_else_next_to_the_model_else_the_user_cache(tmp_path, monkeypatch):
    model_dir = tmp_path / "models" / "mini"
    model_dir.mkdir(parents=True)
    assert onnx_backend.export_directory(model_dir, "~/somewhere") == Path.home() / "somewhere"
    assert onnx_backend.export_directory(model_dir) == tmp_path / "models" / "mini-onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # A hub id has no directory to sit beside.
    assert onnx_backend.export_directory("sentence-transformers/all-MiniLM-L6-v2") == tmp_path / "cache" / "semantic" / "onnx"
    # Beside a model whose folder cannot hold one (a file stands there): the user cache.
    (tmp_path / "models" / "mini-onnx").write_text("not a folder")
    assert not onnx_backend.writable(tmp_path / "models" / "mini-onnx")
    assert onnx_backend.export_directory(model_dir) == tmp_path / "cache" / "semantic" / "onnx"
    assert onnx_backend.writable(tmp_path / "new") and not onnx_backend.writable(tmp_path / "no" / "parent")


def test_export_keys_follow_model_identity_and_precision():
    keys = {onnx_backend.export_key(identity, quantize) for identity in ("files:a", "files:b") for quantize in (None, "int8")}
    assert len(keys) == 4
    assert onnx_backend.export_key("files:a", None).endswith("-fp32")
    assert onnx_backend.export_key("files:a", "int8").endswith("-int8")


@pytest.mark.parametrize(
    "types, problem",
    [
        (["Transformer", "Pooling", "Dense", "Normalize"], None),
        (["sentence_transformers.base.modules.transformer.Transformer", "sentence_transformers.models.Pooling"], None),
        (["Transformer", "WeightedLayerPooling", "Normalize"], "it has module(s) WeightedLayerPooling"),
        (["StaticEmbedding", "Normalize"], "its first module is StaticEmbedding, not a Transformer"),
    ],
)
def test_modules_the_onnx_backend_cannot_run_are_named(tmp_path, types, problem):
    entries = [{"idx": i, "name": str(i), "path": "", "type": name} for i, name in enumerate(types)]
    (tmp_path / "modules.json").write_text(json.dumps(entries))
    found = onnx_backend.unsupported_modules(tmp_path)
    assert found == problem if problem is None else problem in found


# --- vectors --------------------------------------------------------------------------


def test_onnx_vectors_equal_torch_vectors_for_documents_and_queries_with_prefixes(onnx_models):
    for query in (False, True):
        reference = encode("torch_prefixed", TEXTS, query=query)
        vectors = encode("onnx_prefixed", TEXTS, query=query)
        assert vectors.dtype == np.float32 and vectors.shape == reference.shape
        assert cosines(vectors, reference).min() >= 0.9999
    # The prefixes were applied: a text's query and document vectors differ.
    assert cosines(encode("onnx_prefixed", TEXTS, query=True), encode("onnx_prefixed", TEXTS)).max() < 0.9999
    model = get_encoder("onnx_prefixed").model
    assert type(model) is onnx_backend.OnnxSentenceModel and Path(model.path).parent == onnx_models


def test_long_texts_are_truncated_as_torch_truncates_them_and_chunked_alike(onnx_models):
    long_text = " ".join(f"word{i} means nothing here" for i in range(60))
    reference = encode("torch_short", [long_text, "short"])
    vectors = encode("onnx_short", [long_text, "short"])
    assert cosines(vectors, reference).min() >= 0.9999
    # Past the 16-token limit nothing counts: a different tail gives the same vector.
    assert cosines(encode("onnx_short", [long_text + " and an ending that differs"]), vectors[:1]).min() >= 0.99999
    # A text alone and padded in a batch with a long one: the same vector (dynamic axes, masks).
    assert cosines(encode("onnx_short", ["short"]), vectors[1:]).min() >= 0.99999
    onnx_model, torch_model = get_encoder("onnx_short").model, get_encoder("torch_short").model
    assert onnx_model.max_seq_length == torch_model.max_seq_length == 16
    assert onnx_model.get_embedding_dimension() == settings.TINY_DIMENSIONS
    assert Chunker(get_encoder("onnx_short"), 4).split(long_text) == Chunker(get_encoder("torch_short"), 4).split(long_text)


def test_a_batch_runs_in_groups_of_similar_length_each_cut_to_its_longest_text(onnx_models, monkeypatch):
    # Tokens with the prefix: 21, 44, 13, 12, 5; by characters "x " * 40 comes second, not first.
    texts = [TEXTS[2], "x " * 40, TEXTS[0], TEXTS[1], "goal"]
    model = get_encoder("onnx_prefixed").model
    shapes = []
    run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda names, inputs: shapes.append(inputs["input_ids"].shape) or run(names, inputs))
    vectors = encode("onnx_prefixed", texts)
    # Runs end below RUN_LENGTH_RATIO (0.9) of their longest text's tokens, and none is padded past its longest.
    assert shapes == [(1, 44), (1, 21), (2, 13), (1, 5)]
    assert cosines(vectors, encode("torch_prefixed", texts)).min() >= 0.9999


def test_the_onnx_model_frees_the_torch_weights_and_counts_its_calls(onnx_models, stats_delta):
    encoder = get_encoder("onnx_prefixed")
    vectors, failures = encoder.encode(TEXTS, batch_size=2)
    assert failures == {} and all(vector.dtype == np.float32 for vector in vectors)
    transformer = encoder.model.sentence_transformer[0]
    assert {parameter.device.type for parameter in transformer.parameters()} == {"meta"}
    assert encoder.model.device == "cpu"
    assert stats_delta()["texts_encoded"] == len(TEXTS)


def test_int8_runs_close_to_float32_from_its_own_file(onnx_models):
    vectors = encode("onnx_int8", TEXTS)
    reference = encode("tiny", TEXTS)
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
    similarity = cosines(vectors, reference)
    assert similarity.min() > 0.9 and similarity.max() < 1.0  # close, but quantized
    names = sorted(path.name for path in onnx_models.iterdir())
    assert [name.rsplit("-", 1)[1] for name in names] == ["fp32.onnx", "int8.onnx"]


# --- exports: once, atomic, never half read -----------------------------------------------


def export_file(alias):
    return Path(get_encoder(alias).model.path)


def test_a_bert_export_is_fused_and_checked_against_torch(onnx_models):
    import onnx

    path = export_file("onnx_short")
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization"} <= operators
    # The check every export passes: torch's output for the example batch, reproduced.
    model = get_encoder("torch_short").model
    features = model.preprocess(["an example", "a longer example"])
    names = get_encoder("onnx_short").model.input_names
    with torch_inference():
        expected = model[0].model(**{name: features[name] for name in names}).last_hidden_state.numpy()
    onnx_backend._verify(path, features, expected, names)
    with pytest.raises(ImproperlyConfigured, match="differs from the torch model by up to"):
        onnx_backend._verify(path, features, expected + 0.1, names)


def torch_inference():
    import torch

    return torch.inference_mode()


def test_a_second_encoder_reuses_the_export(onnx_models):
    path = export_file("onnx_short")
    written = path.stat().st_mtime_ns
    first = encode("onnx_short", TEXTS)
    clear_encoders()
    assert export_file("onnx_short") == path and path.stat().st_mtime_ns == written
    assert np.allclose(encode("onnx_short", TEXTS), first, atol=1e-6)
    # Only finished files: the temporary ones are gone.
    assert [p.suffix for p in onnx_models.iterdir()] == [".onnx"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "another export"])
def test_a_damaged_export_is_not_used_but_written_again(onnx_models, damage):
    path = export_file("onnx_short")
    good = path.read_bytes()
    expected = encode("onnx_short", TEXTS)
    if damage == "garbage":
        path.write_bytes(b"\x00not an onnx model" * 100)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) - 40])  # loses the export key at the end
    else:
        # A complete model, but not this one's export (its key differs).
        path.write_bytes(good.replace(path.stem.encode(), b"0" * len(path.stem)))
    clear_encoders()
    assert np.allclose(encode("onnx_short", TEXTS), expected, atol=1e-6)
    assert export_file("onnx_short") == path and onnx_backend._open(path, path.stem, 1) is not None


def test_an_export_stamped_with_its_key_is_published_by_rename(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    source = tmp_path / ".export-1.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(source))
    target = tmp_path / "key-fp32.onnx"
    onnx_backend._publish(source, "key-fp32", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export-1.onnx", "key-fp32.onnx"]
    assert {p.key: p.value for p in onnx.load(str(target)).metadata_props} == {onnx_backend.METADATA_KEY: "key-fp32"}
    assert onnx_backend._open(target, "key-fp32", 1) is not None
    assert onnx_backend._open(target, "other-key", 1) is None
    assert onnx_backend._open(tmp_path / "missing.onnx", "key-fp32", 1) is None


# --- what cannot run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_with_layer_norm(tmp_path_factory):
    """The tiny model with a LayerNorm after pooling: a module the onnx backend does not run."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm

    target = tmp_path_factory.mktemp("layer-norm") / "model"
    model = SentenceTransformer(str(settings.TINY_MODEL_DIR), device="cpu")
    SentenceTransformer(modules=[*model, LayerNorm(settings.TINY_DIMENSIONS)], device="cpu").save(str(target))
    return target


def test_a_model_with_modules_the_backend_cannot_run_is_refused_clearly(model_with_layer_norm, onnx_dir):
    entry = {"path": str(model_with_layer_norm), "backend": "onnx", "onnx_dir": str(onnx_dir)}
    with override_settings(SEMANTIC=models_setting(odd=entry)):
        errors = [error for error in check_backends() if error.id == "semantic.E013"]
        assert len(errors) == 1 and "'odd'" in errors[0].msg and "LayerNorm" in errors[0].msg
        assert "'backend': 'torch'" in errors[0].hint
        with pytest.raises(ImproperlyConfigured, match="cannot run on the onnx backend: it has module.s. LayerNorm"):
            get_encoder("odd").model
    assert not onnx_dir.exists()


def test_an_export_that_cannot_be_written_is_a_configuration_error(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with override_settings(SEMANTIC=models_setting(blocked=tiny(backend="onnx", onnx_dir=str(blocked)))):
        with pytest.raises(ImproperlyConfigured, match="'blocked' could not be exported to ONNX in .*a-file: FileExistsError"):
            get_encoder("blocked").model


def test_an_onnx_dir_that_cannot_be_written_is_a_check_error(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    setting = models_setting(blocked=tiny(backend="onnx", onnx_dir=str(blocked)), fine=tiny(backend="onnx", onnx_dir=str(tmp_path / "new")))
    with override_settings(SEMANTIC=setting):
        errors = check_backends()
    assert [error.id for error in errors] == ["semantic.E013"]
    assert "'blocked'" in errors[0].msg and "cannot be written" in errors[0].msg and "onnx_dir" in errors[0].hint


def test_the_test_models_pass_the_backend_check():
    assert check_backends() == []
