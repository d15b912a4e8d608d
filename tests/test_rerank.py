"""
Reranking with a cross-encoder: a tiny random BERT cross-encoder, loaded by
semantic.rerank through sentence-transformers' real loading code, checked
against an independent CrossEncoder instance over the same pairs.
"""

from operator import itemgetter

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from semantic import rerank
from semantic.encoders import resolve_device, use_half_precision
from semantic.hashing import clean_text

QUERY = "  where do cats sleep during the day?\x00 "
TEXTS = [
    "Cats sleep in warm, sunny spots for most of the afternoon.",
    "The stock market fell sharply on Tuesday.",
    "  A recipe for sourdough bread with a crisp crust.\x00",
    "Dogs bark at night.",
    "Kittens nap in cardboard boxes, on sofas and in laundry baskets.",
    "Quantum physics lecture notes, week three: entanglement.",
    "x",
    "Where to sleep in Paris: hotels near the Louvre.",
]


@pytest.fixture(scope="module")
def oracle(cross_encoder_dir):
    """An independent CrossEncoder over the same directory (not semantic's)."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder_dir), device="cpu")


def oracle_scores(oracle, query, texts):
    pairs = [(clean_text(query), clean_text(text)) for text in texts]
    return [float(score) for score in oracle.predict(pairs, show_progress_bar=False)]


def with_reranker(settings, value, **other):
    """Set SEMANTIC["RERANKER"] (and other SEMANTIC keys) for one test."""
    settings.SEMANTIC = {**settings.SEMANTIC, "RERANKER": value, **other}


@pytest.fixture
def reranker(settings, cross_encoder_dir):
    with_reranker(settings, str(cross_encoder_dir))
    return rerank.get_reranker()


def test_rerank_order_and_scores_match_an_independent_cross_encoder(reranker, oracle):
    expected = oracle_scores(oracle, QUERY, TEXTS)
    # The tiny model separates these texts by far more than the tolerance,
    # so the order below is decided by the model, not by rounding.
    ordered = sorted(expected)
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 1e-4

    candidates = [{"id": i, "body": text} for i, text in enumerate(TEXTS)]
    ranked = reranker.rerank(QUERY, candidates, itemgetter("body"))

    expected_order = sorted(range(len(TEXTS)), key=lambda i: expected[i], reverse=True)
    assert [candidate["id"] for candidate, _ in ranked] == expected_order
    for candidate, score in ranked:
        assert isinstance(score, float)
        assert score == pytest.approx(expected[candidate["id"]], abs=1e-5)


def test_score_keeps_input_order_across_batches(settings, cross_encoder_dir, oracle):
    # Three pairs per forward pass: several batches, sorted by length inside.
    with_reranker(settings, {"path": str(cross_encoder_dir), "batch_size": 3})
    reranker = rerank.get_reranker()
    assert reranker.batch_size == 3
    assert reranker.score(QUERY, TEXTS) == pytest.approx(oracle_scores(oracle, QUERY, TEXTS), abs=1e-5)


def test_batch_size_defaults_to_the_batch_size_setting(reranker, settings):
    assert reranker.batch_size == settings.SEMANTIC["BATCH_SIZE"]


def test_texts_are_cleaned(reranker):
    dirty = reranker.score("  where do cats sleep\x00 ", ["\x00 warm sunny spots  ", "  "])
    clean = reranker.score("where do cats sleep", ["warm sunny spots", ""])
    assert dirty == pytest.approx(clean, abs=1e-6)


def test_top_k(reranker):
    candidates = list(range(len(TEXTS)))
    full = reranker.rerank(QUERY, candidates, TEXTS.__getitem__)
    assert reranker.rerank(QUERY, candidates, TEXTS.__getitem__, top_k=3) == full[:3]
    assert reranker.rerank(QUERY, candidates, TEXTS.__getitem__, top_k=100) == full
    assert reranker.rerank(QUERY, candidates, TEXTS.__getitem__, top_k=0) == []
    with pytest.raises(ValueError):
        reranker.rerank(QUERY, candidates, TEXTS.__getitem__, top_k=-1)


def test_no_candidates(reranker):
    def text_of(candidate):
        raise AssertionError("not called for no candidates")

    assert reranker.rerank(QUERY, [], text_of) == []
    assert reranker.rerank(QUERY, iter(()), text_of, top_k=5) == []
    assert reranker.score(QUERY, []) == []


def test_ties_keep_the_input_order(reranker, monkeypatch):
    monkeypatch.setattr(reranker, "score", lambda query, texts: [0.5, 0.9, 0.5, 0.9, 0.1])
    ranked = reranker.rerank("q", ["a", "b", "c", "d", "e"], str)
    assert ranked == [("b", 0.9), ("d", 0.9), ("a", 0.5), ("c", 0.5), ("e", 0.1)]


def test_unconfigured(settings):
    settings.SEMANTIC = {key: value for key, value in settings.SEMANTIC.items() if key != "RERANKER"}
    assert not rerank.is_reranking_configured()
    with pytest.raises(ImproperlyConfigured, match=r"SEMANTIC\['RERANKER'\] is None"):
        rerank.get_reranker()


def test_configured(settings, cross_encoder_dir):
    with_reranker(settings, str(cross_encoder_dir))
    assert rerank.is_reranking_configured()


@pytest.mark.parametrize(
    "value",
    [
        "/nonexistent/semantic-reranker",
        {"path": "/nonexistent/semantic-reranker", "max_length": 64},
        # Not a directory, so a hub id: the hub is offline in tests.
        "semantic-tests/no-such-reranker",
        {"package": "no_such_reranker_package"},
    ],
)
def test_a_model_that_does_not_load(settings, value):
    with_reranker(settings, value)
    with pytest.raises(ImproperlyConfigured, match=r"SEMANTIC\['RERANKER'\]|not installed"):
        rerank.get_reranker()


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "exactly one of 'path'"),
        ({"path": "/a", "package": "b"}, "exactly one of 'path'"),
        ({}, "exactly one of 'path'"),
        ({"path": "/a", "max_len": 64}, r"Unknown key\(s\) in settings.SEMANTIC\['RERANKER'\]: max_len"),
        ({"path": "/a", "batch_size": 0}, "positive int"),
        ({"path": "/a", "max_length": "64"}, "positive int"),
        (42, "must be None, a model directory or a dict"),
    ],
)
def test_malformed_settings(settings, value, message):
    with_reranker(settings, value)
    with pytest.raises(ImproperlyConfigured, match=message):
        rerank.get_reranker()


def test_a_model_with_several_labels_is_refused(settings, tmp_path, cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    three = CrossEncoder(
        str(cross_encoder_dir), device="cpu", num_labels=3, model_kwargs={"ignore_mismatched_sizes": True}
    )
    three.save_pretrained(str(tmp_path / "three"))
    with_reranker(settings, str(tmp_path / "three"))
    with pytest.raises(ImproperlyConfigured, match="num_labels=1"):
        rerank.get_reranker()


def test_loaded_once_and_dropped_when_settings_change(settings, cross_encoder_dir):
    with_reranker(settings, str(cross_encoder_dir))
    first = rerank.get_reranker()
    assert rerank.get_reranker() is first
    with override_settings(SEMANTIC=settings.SEMANTIC):
        inside = rerank.get_reranker()
        assert inside is not first
        assert rerank.get_reranker() is inside
    assert rerank.get_reranker() not in (first, inside)


def test_max_length_is_applied(settings, cross_encoder_dir):
    with_reranker(settings, {"path": str(cross_encoder_dir), "max_length": 16})
    assert rerank.get_reranker().model.max_seq_length == 16


def test_configured_cpu_device(reranker):
    assert reranker.device == "cpu"
    parameter = next(reranker.model.parameters())
    assert parameter.device.type == "cpu"
    assert str(parameter.dtype) == "torch.float32"


def test_half_precision_decision():
    assert use_half_precision("cuda", True)
    assert use_half_precision("cuda:1", True)
    assert not use_half_precision("cuda", False)
    assert not use_half_precision("cpu", True)
    assert not use_half_precision("mps", True)


def test_device_resolution_follows_the_encoders_rules():
    # A forced device is used as given, even where it is missing (torch then
    # fails to load there); "auto" asks what is available.
    assert resolve_device("cuda", cuda_available=False, mps_available=False) == "cuda"
    assert resolve_device("cpu", cuda_available=True, mps_available=True) == "cpu"
    assert resolve_device("auto", cuda_available=True, mps_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False, mps_available=True) == "mps"
    assert resolve_device("auto", cuda_available=False, mps_available=False) == "cpu"


class FakeCrossEncoder:
    """Stands in for CrossEncoder where the configured device does not exist here."""

    num_labels = 1
    instances = []

    def __init__(self, location, **kwargs):
        self.location = location
        self.kwargs = kwargs
        self.halved = False
        FakeCrossEncoder.instances.append(self)

    def half(self):
        self.halved = True
        return self


@pytest.mark.parametrize(
    "device, cuda_available, fp16, loaded_on, halved",
    [
        ("cuda", False, True, "cuda", True),
        ("cuda:1", False, True, "cuda:1", True),
        ("cuda", False, False, "cuda", False),
        ("auto", True, True, "cuda", True),
        ("auto", False, True, "cpu", False),
        ("cpu", True, True, "cpu", False),
    ],
)
def test_device_and_fp16_come_from_the_settings(
    settings, cross_encoder_dir, monkeypatch, device, cuda_available, fp16, loaded_on, halved
):
    import sentence_transformers
    import torch

    monkeypatch.setattr(sentence_transformers, "CrossEncoder", FakeCrossEncoder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with_reranker(settings, str(cross_encoder_dir), DEVICE=device, CUDA_FP16=fp16)

    reranker = rerank.get_reranker()
    assert reranker.device == loaded_on
    assert reranker.model.kwargs["device"] == loaded_on
    assert reranker.model.halved is halved


def test_fp16_runs_the_model_in_half_precision(settings, cross_encoder_dir, oracle, monkeypatch):
    # The CPU can run fp16 too: the half-precision path, end to end.
    monkeypatch.setattr(rerank, "use_half_precision", lambda device: True)
    with_reranker(settings, str(cross_encoder_dir))
    reranker = rerank.get_reranker()
    assert str(next(reranker.model.parameters()).dtype) == "torch.float16"
    scores = reranker.score(QUERY, TEXTS)
    assert all(isinstance(score, float) for score in scores)
    assert scores == pytest.approx(oracle_scores(oracle, QUERY, TEXTS), abs=5e-3)


def test_out_of_memory_halves_the_batch_and_a_pair_that_never_fits_ranks_last(
    reranker, oracle, monkeypatch
):
    expected = oracle_scores(oracle, QUERY, TEXTS)
    calls = []
    real_predict = reranker.model.predict

    def predict(pairs, batch_size, **kwargs):
        calls.append(len(pairs))
        if len(pairs) > 2 or any(text == "x" for _, text in pairs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_predict(pairs, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(reranker.model, "predict", predict)
    monkeypatch.setattr(rerank, "release_accelerator_memory", lambda: None)
    ranked = reranker.rerank(QUERY, list(range(len(TEXTS))), TEXTS.__getitem__)

    assert calls[0] == len(TEXTS)
    assert calls[-1] == 1
    assert ranked[-1] == (TEXTS.index("x"), rerank.UNSCORED)
    for index, score in ranked[:-1]:
        assert score == pytest.approx(expected[index], abs=1e-5)
