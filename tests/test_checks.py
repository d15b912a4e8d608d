"""System checks: each fires on the mistake it names, with a hint, and stays quiet otherwise."""

import pytest
from celery import current_app
from django.core import checks
from django.db import models
from django.test.utils import isolate_apps
from pgvector.django import HnswIndex

from semantic import EmbeddingField
from semantic.checks import _version, check_broker, check_model_files, check_pgvector
from tests.searchapp.models import IpPassage, Passage
from tests.testapp.models import Note


def ids(messages):
    return [message.id for message in messages]


def test_a_field_without_vector_index_gets_a_warning_with_the_meta_line():
    warnings = [m for m in Note._meta.get_field("embedding").check() if m.id == "semantic.W001"]
    assert len(warnings) == 1
    assert 'HnswIndex(name="note_embedding_hnsw", fields=["embedding"], opclasses=["vector_cosine_ops"])' in warnings[0].hint
    assert "semantic.W001" not in ids(Passage._meta.get_field("embedding").check())
    assert "semantic.W002" not in ids(IpPassage._meta.get_field("embedding").check())


@isolate_apps("tests.testapp")
def test_an_index_of_another_metric_and_an_unknown_metric_are_reported():
    class L2Note(models.Model):
        text = models.TextField()
        embedding = EmbeddingField(source="text", model="tiny", metric="l2", chunks=False)

        class Meta:
            app_label = "testapp"
            indexes = [HnswIndex(name="l2note_hnsw", fields=["embedding"], opclasses=["vector_cosine_ops"])]

    class OddNote(models.Model):
        text = models.TextField()
        embedding = EmbeddingField(source="text", model="tiny", metric="manhattan", chunks=False)

        class Meta:
            app_label = "testapp"

    messages = L2Note._meta.get_field("embedding").check()
    assert "semantic.W002" in ids(messages)
    assert "vector_l2_ops" in next(m for m in messages if m.id == "semantic.W002").hint
    assert "semantic.E006" in ids(OddNote._meta.get_field("embedding").check())


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"path": "/no/such/model"}, "not a model directory"),
        ({"path": "sentence-transformers/all-mpnet-base-v2"}, "HF_HUB_OFFLINE"),
        ({"package": "no_such_model_package"}, "not installed"),
    ],
    ids=["missing-dir", "hub-id-offline", "missing-package"],
)
def test_a_model_that_cannot_load_offline_is_an_error(settings, monkeypatch, entry, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.SEMANTIC = {**settings.SEMANTIC, "MODELS": {**settings.SEMANTIC["MODELS"], "broken": entry}}
    errors = check_model_files()
    assert ids(errors) == ["semantic.E011"]
    assert "'broken'" in errors[0].msg and fragment in errors[0].msg


def test_configured_models_and_reranker_pass(settings, cross_encoder_dir):
    assert check_model_files() == []
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": str(cross_encoder_dir)}
    assert check_model_files() == []
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": "/no/such/reranker"}
    assert ids(check_model_files()) == ["semantic.E012"]


@pytest.mark.django_db
def test_pgvector_here_is_new_enough():
    assert check_pgvector(databases=["default"]) == []
    assert _version("0.7.4") < (0, 8, 0) <= _version("0.8.0") < _version("0.10.1")


def test_an_unreachable_broker_is_a_deploy_warning(monkeypatch):
    assert check_broker() == []
    monkeypatch.setattr(current_app.conf, "broker_url", "redis://127.0.0.1:9/0")
    warnings = check_broker()
    assert ids(warnings) == ["semantic.W030"]
    assert isinstance(warnings[0], checks.Warning)
