"""The real packaged all-MiniLM-L6-v2: the seed's examples must mean what they say."""

import numpy as np
import pytest
from django.db import transaction

from semantic.encoders import get_encoder
from tests.conftest import wait_until
from tests.testapp.models import SupportAnswer


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_password_reset_is_closer_to_forgotten_credentials_than_to_france():
    encoder = get_encoder("default")
    (query, related, unrelated), failed = encoder.encode(
        ["How do I reset my password?", "I forgot my login credentials.", "What is the capital of France?"]
    )
    assert not failed
    assert encoder.model.get_embedding_dimension() == 384
    assert cosine(query, related) > cosine(query, unrelated) + 0.2


ANSWERS = {
    "refund": "To get your money back, open Orders, pick the order and choose Request a refund.",
    "password": "If you forgot your login credentials, use the Forgot password link on the sign-in page.",
    "shipping": "Parcels usually arrive within three to five working days after dispatch.",
    "cancel": "You can end your subscription at any time from the Billing page.",
    "address": "Change where we deliver under Account, then Saved addresses.",
}

QUESTIONS = {
    "How do I reset my password?": "password",
    "When will my package be delivered?": "shipping",
    "I want to cancel my plan": "cancel",
    "Can I get a refund for a broken item?": "refund",
}


@pytest.mark.django_db(transaction=True)
def test_search_over_support_answers_ranks_the_right_answer_first(celery_worker):
    with transaction.atomic():
        rows = {key: SupportAnswer.objects.create(text=text) for key, text in ANSWERS.items()}
    wait_until(lambda: not SupportAnswer.objects.filter(embedding=None).exists(), timeout=120, message="answers embedded")
    for question, key in QUESTIONS.items():
        best = SupportAnswer.objects.semantic_search(question, k=1)[0]
        assert best.pk == rows[key].pk, f"{question!r} found {best.text!r}"
