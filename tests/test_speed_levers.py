"""Speed levers keep the trainer's rules: length grouping keeps no-duplicate batches and determinism;
length-bucketed forwards give the same embeddings and gradients as one padded forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import token_texts
from mnr.batching import Collator, GlobalBatchSampler
from mnr.config import ConfigError, TrainConfig


def example_lengths(token_ids: list[list[int]], text_ids: np.ndarray) -> np.ndarray:
    """(n_examples,) token length of each example's longest text: what its batch is padded to."""
    text_lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    return text_lengths[np.asarray(text_ids)].max(axis=1)


def _clashing_data(n: int = 400, seed: int = 0):
    """Examples (anchor, positive) where anchors repeat (as NLI premises do) and lengths vary."""
    rng = np.random.default_rng(seed)
    anchors = rng.integers(0, n // 3, size=n)  # about three examples per anchor text
    positives = np.arange(n) + n  # unique positives
    text_ids = np.stack([anchors, positives], axis=1)
    token_ids = [[1] * int(k) for k in rng.integers(3, 40, size=2 * n)]
    return text_ids, token_ids


@pytest.mark.parametrize("world_size", [1, 2])
def test_length_grouping_keeps_no_duplicate_rule_and_determinism(world_size):
    text_ids, token_ids = _clashing_data()
    lengths = example_lengths(token_ids, text_ids)
    make = lambda: GlobalBatchSampler(text_ids, 8, world_size, 0, seed=3, lengths=lengths, length_grouping=4)
    batches = make().global_batches(0)
    assert len(batches) > 20
    for batch in batches:
        assert len(batch) == 8 * world_size
        texts = text_ids[batch].reshape(-1)
        assert len(set(texts.tolist())) == len(texts)  # no text twice in a global batch
    assert len({int(i) for b in batches for i in b}) == sum(len(b) for b in batches)  # no example twice
    assert all((a == b).all() for a, b in zip(batches, make().global_batches(0)))  # same seed, same batches
    assert not all((a == b).all() for a, b in zip(batches, make().global_batches(1)))  # new epoch, new order
    slices = [GlobalBatchSampler(text_ids, 8, world_size, r, seed=3, lengths=lengths, length_grouping=4)
              .local_batches(0) for r in range(world_size)]
    for step, batch in enumerate(batches):
        assert (np.concatenate([s[step] for s in slices]) == batch).all()


def test_length_grouping_pads_less_and_off_changes_nothing():
    text_ids, token_ids = _clashing_data()
    lengths = example_lengths(token_ids, text_ids)
    plain = GlobalBatchSampler(text_ids, 8, seed=1).global_batches(0)
    off = GlobalBatchSampler(text_ids, 8, seed=1, lengths=lengths, length_grouping=0).global_batches(0)
    assert all((a == b).all() for a, b in zip(plain, off)) and len(plain) == len(off)
    grouped = GlobalBatchSampler(text_ids, 8, seed=1, lengths=lengths, length_grouping=8).global_batches(0)
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches) / sum(len(b) for b in batches)
    assert padded(grouped) < 0.9 * padded(plain)


def test_length_grouping_needs_lengths():
    text_ids, _ = _clashing_data()
    with pytest.raises(ValueError, match="length_grouping"):
        GlobalBatchSampler(text_ids, 8, length_grouping=4)


def test_length_buckets_same_embeddings_and_gradients(tiny_model):
    from mnr.model import load_encoder

    encoder, tokenizer = load_encoder(str(tiny_model))
    texts = ["a man is playing", "a dog", "two children are sitting on the grass near a red car",
             "the woman is eating food outside in the street with a cat", "a boy", "people walking",
             "a black and white dog is running in the water", "an old man"]
    token_ids = [tokenizer(t)["input_ids"] for t in texts]
    text_ids = np.arange(len(texts)).reshape(2, -1).T  # 4 examples: (anchor, positive)
    batch = Collator(token_texts(token_ids), text_ids, tokenizer.pad_token_id)(np.arange(4))

    def embed_and_grad(buckets: int):
        encoder.zero_grad(set_to_none=True)
        encoder.length_buckets = buckets
        emb = encoder(batch["input_ids"], batch["attention_mask"])
        (emb ** 2).sum().backward()
        return emb.detach(), [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    ref_emb, ref_grads = embed_and_grad(1)
    for buckets in (2, 4):
        emb, grads = embed_and_grad(buckets)
        torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_lever_flags_validated():
    with pytest.raises(ConfigError, match="length_buckets"):
        TrainConfig(length_buckets=0)
    with pytest.raises(ConfigError, match="length_grouping"):
        TrainConfig(length_grouping=-1)


@pytest.mark.slow
def test_train_with_levers_smoke(tiny_model, nli_file, tmp_path, cache_dir):
    from mnr.train import main

    out = tmp_path / "out"
    rc = main(["--model", str(tiny_model), "--train-data", str(nli_file), "--batch-size", "4", "--max-steps", "3",
               "--eval-data", "none", "--report-to", "none", "--no-progress", "--output-dir", str(out),
               "--length-buckets", "2", "--length-grouping", "4", "--max-seq-length", "32"])
    assert rc == 0 and (out / "metrics.jsonl").is_file()
