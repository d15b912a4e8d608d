"""Declarations and settings: bad input gets a clear error, devices are chosen by configuration."""

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.test import override_settings
from django.test.utils import isolate_apps

from semantic import EmbeddingField
from semantic.conf import semantic_settings
from semantic.encoders import Encoder, get_encoder, resolve_device
from semantic.worker import embed_batch
from tests.conftest import pending
from tests.testapp.models import MismatchedNote, Note


def check_ids(model):
    return [error.id for error in model.check()]


@isolate_apps("tests.testapp")
def test_source_naming_a_missing_attribute_is_reported():
    class Broken(models.Model):
        class Meta:
            app_label = "testapp"

        title = models.CharField(max_length=10)
        embedding = EmbeddingField(source=["title", "summary"], model="tiny")

    errors = [e for e in Broken.check() if e.id == "semantic.E001"]
    assert len(errors) == 1 and "summary" in errors[0].msg


@isolate_apps("tests.testapp")
def test_source_may_name_fields_properties_methods_or_be_a_callable():
    class Fine(models.Model):
        class Meta:
            app_label = "testapp"

        title = models.CharField(max_length=10)
        embedding = EmbeddingField(source=["title", "label", "describe"], model="tiny")
        other = EmbeddingField(source=lambda obj: obj.title.upper(), model="tiny")

        @property
        def label(self):
            return "label"

        def describe(self):
            return "described"

    # Only the advice to add a vector index (W001): the sources are all fine.
    assert not [i for i in check_ids(Fine) if i.startswith("semantic") and i != "semantic.W001"]
    obj = Fine(title="t")
    assert Fine._meta.get_field("embedding").build_text(obj) == "t\n\nlabel\n\ndescribed"
    assert Fine._meta.get_field("other").build_text(obj) == "T"


@isolate_apps("tests.testapp")
def test_unknown_model_alias_is_reported_not_raised_at_import():
    class Unknown(models.Model):
        class Meta:
            app_label = "testapp"

        text = models.TextField()
        embedding = EmbeddingField(source="text", model="nonexistent", dimensions=8)

    errors = [e for e in Unknown.check() if e.id == "semantic.E002"]
    assert len(errors) == 1 and "'nonexistent'" in errors[0].msg and "default" in errors[0].msg
    with pytest.raises(ImproperlyConfigured, match="Unknown semantic model alias 'nonexistent'"):
        get_encoder("nonexistent")


@isolate_apps("tests.testapp")
def test_declared_dimension_mismatch_is_reported_by_checks():
    class Wrong(models.Model):
        class Meta:
            app_label = "testapp"

        text = models.TextField()
        embedding = EmbeddingField(source="text", model="tiny", dimensions=16)

    errors = [e for e in Wrong.check() if e.id == "semantic.E004"]
    assert len(errors) == 1 and "16" in errors[0].msg and "32" in errors[0].msg


@pytest.mark.django_db
def test_model_dimension_mismatch_found_on_load_is_a_clear_error():
    MismatchedNote.objects.create(text="a sixteen-dimensional column cannot hold this")
    with pytest.raises(ImproperlyConfigured, match=r"MismatchedNote.embedding has 16 dimensions .* 32-dimensional"):
        embed_batch(MismatchedNote._meta.get_field("embedding"))
    assert MismatchedNote.objects.get().embedding is None


@pytest.mark.django_db
def test_saving_never_loads_a_model():
    from semantic.encoders import clear_encoders

    clear_encoders()
    note = Note.objects.create(title="Saved without any model", body="hashing only")
    assert note.embedding_source_hash.startswith(Note._meta.get_field("embedding").fingerprint)
    assert not get_encoder("tiny").is_loaded


def test_misspelt_settings_key_is_a_clear_error():
    with override_settings(SEMANTIC={"BATCH_SIZ": 8}):
        with pytest.raises(ImproperlyConfigured, match="Unknown key.*BATCH_SIZ"):
            semantic_settings.BATCH_SIZE
    from semantic.checks import check_settings

    with override_settings(SEMANTIC={"BATCH_SIZE": 0}):
        assert [e.id for e in check_settings()] == ["semantic.E010"]


def test_model_entry_needs_exactly_one_location():
    with override_settings(SEMANTIC={"MODELS": {"default": {"dimensions": 3}}}):
        with pytest.raises(ImproperlyConfigured, match="exactly one of 'path'"):
            semantic_settings.model_config("default")


def test_hub_name_that_is_not_available_offline_is_a_clear_error():
    with override_settings(SEMANTIC={"MODELS": {"hub": {"path": "sentence-transformers/not-downloaded-here"}}}):
        with pytest.raises(ImproperlyConfigured, match="Cannot load semantic model 'hub'"):
            get_encoder("hub").model


@pytest.mark.parametrize(
    "requested, cuda, mps, expected",
    [
        ("auto", True, True, "cuda"),
        ("auto", False, True, "mps"),
        ("auto", False, False, "cpu"),
        ("cpu", True, True, "cpu"),
        ("cuda:1", False, False, "cuda:1"),
    ],
)
def test_device_choice(requested, cuda, mps, expected):
    assert resolve_device(requested, cuda_available=cuda, mps_available=mps) == expected


def test_configured_cpu_device_loads_on_cpu():
    assert semantic_settings.DEVICE == "cpu"
    assert get_encoder("tiny").model.device.type == "cpu"


def test_fingerprint_covers_everything_that_changes_vectors(settings):
    base = {"path": str(settings.TINY_MODEL_DIR), "dimensions": 32}
    variants = [
        {},
        {"document_prefix": "passage: "},
        {"normalize": False},
        {"max_seq_length": 64},
        {"revision": "v2"},
    ]
    fingerprints = set()
    for variant in variants:
        with override_settings(SEMANTIC={"MODELS": {"m": {**base, **variant}}}):
            fingerprints.add(Encoder("m").fingerprint)
    assert len(fingerprints) == len(variants)
    with override_settings(SEMANTIC={"MODELS": {"m": {**base, "query_prefix": "query: "}}}):
        encoder = Encoder("m")
        assert encoder.text_hash("x") != encoder.text_hash("x", query=True)


def test_model_identity_follows_the_files_not_the_path(tmp_path, settings):
    import shutil

    from semantic.hashing import model_identity

    copy = shutil.copytree(settings.TINY_MODEL_DIR, tmp_path / "copy")
    assert model_identity(copy) == model_identity(settings.TINY_MODEL_DIR)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a retrained model: same size, other trained values
    weights.write_bytes(bytes(data))
    assert model_identity(copy) != model_identity(settings.TINY_MODEL_DIR)


@pytest.mark.django_db
def test_switching_the_model_configuration_makes_rows_stale(settings):
    field = Note._meta.get_field("embedding")
    note = Note.objects.create(title="Embedded under one configuration")
    embed_batch(field)
    assert pending(field) == 0
    changed = {**settings.SEMANTIC, "MODELS": {**settings.SEMANTIC["MODELS"], "tiny": {**settings.SEMANTIC["MODELS"]["tiny"], "document_prefix": "passage: "}}}
    with override_settings(SEMANTIC=changed):
        assert pending(field) == 1
        embed_batch(field)
        assert pending(field) == 0
        assert Note.objects.get(pk=note.pk).embedding_vector_hash.startswith(field.fingerprint)


class FakeOutOfMemory(RuntimeError):
    def __init__(self):
        super().__init__("CUDA out of memory. Tried to allocate 2.00 GiB")


def fits_in(limit, fail_on=()):
    """An encode function that runs out of memory above ``limit`` texts per batch."""
    calls = []

    def encode(texts, size):
        calls.append(len(texts))
        if len(texts) > limit or any(t in fail_on for t in texts):
            raise FakeOutOfMemory()
        return [np.full(2, len(t), dtype=np.float32) for t in texts]

    return encode, calls


def test_out_of_memory_halves_the_batch_until_it_fits():
    from semantic.encoders import encode_with_backoff

    texts = [f"text {i}" for i in range(20)]
    encode, calls = fits_in(5)
    released = []
    vectors, failures = encode_with_backoff(encode, texts, 16, on_out_of_memory=lambda: released.append(1))
    assert failures == {} and all(v is not None for v in vectors)
    assert calls[:3] == [16, 8, 4] and set(calls[2:]) == {4}
    assert len(released) == 2


def test_a_text_too_big_even_alone_fails_alone():
    from semantic.encoders import encode_with_backoff

    texts = ["a", "b", "huge", "c"]
    encode, calls = fits_in(8, fail_on={"huge"})
    vectors, failures = encode_with_backoff(encode, texts, 4)
    assert failures == {2: "out of memory even alone"}
    assert vectors[2] is None and all(vectors[i] is not None for i in (0, 1, 3))


def test_a_text_that_breaks_the_encoder_fails_alone():
    from semantic.encoders import encode_with_backoff

    calls = []

    def encode(texts, size):
        calls.append(list(texts))
        if "poison" in texts:
            raise ValueError("tokenizer exploded")
        return [np.full(2, len(t), dtype=np.float32) for t in texts]

    texts = ["a", "b", "poison", "c", "d", "e"]
    vectors, failures = encode_with_backoff(encode, texts, 4)
    assert failures == {2: "ValueError: tokenizer exploded"}
    assert vectors[2] is None and [len(vectors[i]) for i in (0, 1, 3, 4, 5)] == [2] * 5
    # The failed batch again text by text, then batches as before.
    assert calls == [["a", "b", "poison", "c"], ["a"], ["b"], ["poison"], ["c"], ["d", "e"]]


def test_an_encoder_that_fails_every_text_raises():
    from semantic.encoders import encode_with_backoff

    def broken(texts, size):
        raise ValueError("the device is gone")

    # Every text of the batch fails alone too: the encoder is broken, not the
    # texts, and no row should be marked failed for it.
    with pytest.raises(ValueError, match="the device is gone"):
        encode_with_backoff(broken, ["a", "b", "c"], 4)
    # A single text cannot tell the two apart: it fails alone.
    assert encode_with_backoff(broken, ["a"], 4)[1] == {0: "ValueError: the device is gone"}


@pytest.mark.parametrize(
    "setting, device, expected",
    [(32, "cuda:0", 32), ({"cuda": 256, "cpu": 64}, "cuda:1", 256), ({"cuda": 256, "cpu": 64}, "cpu", 64), ({"default": 8}, "mps", 8)],
)
def test_batch_size_per_device(setting, device, expected):
    from semantic.encoders import batch_size_for

    assert batch_size_for(device, setting) == expected


def test_torch_threads_setting_applies_when_a_model_loads(settings):
    import torch

    from semantic.encoders import get_encoder

    before = torch.get_num_threads()
    try:
        settings.SEMANTIC = {**settings.SEMANTIC, "TORCH_THREADS": 1}
        get_encoder("tiny").model
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
