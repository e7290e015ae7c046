"""Token-budget GradCache chunks (mnr.chunks): each chunk within its budget, rows in order, and the cached
gradient over them equal to the plain one (padded encoder and unpadded path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from mnr.chunks import cached_loss_and_backward_by_tokens, token_budget_chunks
from mnr.loss import mnr_loss, split_roles
from mnr.model import load_encoder
from mnr.unpadded import UnpaddedEncoder

TEXTS = [f"a man {i} is playing with the dog near the house" + " again" * (i % 5) for i in range(8)] + \
        [f"the person {i} plays" + " outside" * (i % 3) for i in range(8)]


def test_chunks_keep_rows_in_order_within_the_token_budget():
    lengths = [5, 3, 9, 2, 2, 30, 4, 4, 4, 1]
    for padded in (True, False):
        for budget in (1, 8, 10, 16, 40, 1000):
            chunks = token_budget_chunks(lengths, budget, padded)
            assert np.concatenate(chunks).tolist() == list(range(len(lengths)))
            for c in chunks:
                cost = len(c) * max(lengths[i] for i in c) if padded else sum(lengths[i] for i in c)
                assert cost <= budget or len(c) == 1  # a row over the budget alone gets its own chunk
    assert [c.tolist() for c in token_budget_chunks(lengths, 12)] == [[0, 1], [2], [3, 4], [5], [6, 7, 8], [9]]
    assert [c.tolist() for c in token_budget_chunks(lengths, 12, padded=False)] == [[0, 1], [2, 3], [4], [5],
                                                                                     [6, 7, 8], [9]]
    assert token_budget_chunks([], 10) == []
    with pytest.raises(ValueError, match="budget=0"):
        token_budget_chunks(lengths, 0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_encoder(str(build_tiny_model(tmp_path_factory.mktemp("chunks-tiny") / "m")))


def loss_fn(embeddings):
    return mnr_loss(*split_roles(embeddings, 2))


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("unpadded", [False, True])
@pytest.mark.parametrize("budget", [1, 40, 64, 10_000])
def test_cached_gradient_over_token_budget_chunks_equals_the_plain_gradient(encoder, budget, unpadded):
    model, tokenizer = encoder
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(ids, mask))
    loss.backward()
    plain = grads(model)
    chunked_model = UnpaddedEncoder(model.transformer, "mean") if unpadded else model
    cached = cached_loss_and_backward_by_tokens(chunked_model, ids, mask, budget, loss_fn, padded=not unpadded,
                                                lengths=mask.sum(dim=1))
    assert float(cached) == pytest.approx(float(loss.detach()), abs=1e-6)
    for a, b in zip(grads(model), plain):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max()) / 2), rtol=0)
    model.transformer.set_attn_implementation("sdpa")
