"""GradCache (mnr.gradcache) in one process: the cached step gives the gradient of the uncached loss.

The 2-process case (DDP, no_sync, gathered negatives) is in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from mnr.gradcache import cached_loss_and_backward
from mnr.loss import mnr_loss, split_roles
from mnr.model import load_encoder

TEXTS = {
    "anchor": [f"a man {i} is playing with the dog near the house" for i in range(6)],
    "positive": [f"the person {i} plays outside" for i in range(6)],
    "negative": [f"two women {i} are sleeping" for i in range(6)],
    "negative_2": [f"a cat {i} sits on the roof" for i in range(6)],
    "negative_3": [f"nobody {i} is at the beach today" for i in range(6)],
}
K3 = ("anchor", "positive", "negative", "negative_2", "negative_3")
# k = 3 with empty slots (examples with fewer than 3 negatives): the masked ones take no part in the loss
MASK = {"negative_mask": torch.tensor([[True, True, True], [True, False, False], [True, True, False]] * 2)}


def batch(tokenizer, roles):
    enc = tokenizer([t for role in roles for t in TEXTS[role]], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_encoder(str(build_tiny_model(tmp_path_factory.mktemp("gc-tiny") / "m")))


@pytest.fixture(scope="module")
def encoder_dropout(tmp_path_factory):
    return load_encoder(str(build_tiny_model(tmp_path_factory.mktemp("gc-tiny-dropout") / "m", dropout=0.1)))


MATRYOSHKA = {"dims": (32, 16, 8), "dim_weights": (1.0, 0.5, 0.25)}  # the tiny model is 32-d


def tolerance(grad_max: float) -> float:
    """1e-5 for gradients up to 2 (the plain loss's are ~2.1 here); float32 rounding grows with the gradient, and
    truncated Matryoshka embeddings have much larger ones (small norms), so the bound grows with them: the same
    relative tolerance for every case."""
    return 1e-5 * max(1.0, grad_max / 2.0)


@pytest.mark.parametrize("roles,options", [(("anchor", "positive"), {}),
                                           (("anchor", "positive", "negative"), {}),
                                           (("anchor", "positive", "negative"), {"symmetric": True}),
                                           (("anchor", "positive", "negative"), MATRYOSHKA),
                                           (K3, {}), (K3, MASK)])
@pytest.mark.parametrize("mini_batch_size", [1, 4, 7])
def test_cached_gradient_equals_uncached(encoder, roles, options, mini_batch_size):
    model, tokenizer = encoder
    model.train()
    ids, mask = batch(tokenizer, roles)

    def loss_fn(embeddings):
        parts = split_roles(embeddings, len(roles))
        return mnr_loss(parts[0], parts[1], parts[2:] or None, **options)

    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(ids, mask))
    loss.backward()
    uncached = grads(model)
    cached_loss = cached_loss_and_backward(model, ids, mask, mini_batch_size, loss_fn)
    cached = grads(model)
    assert float(cached_loss) == pytest.approx(float(loss.detach()), abs=1e-6)
    grad_max = max(float(g.abs().max()) for g in uncached)
    assert grad_max > 1e-2
    assert max_diff(cached, uncached) < tolerance(grad_max)


def test_dropout_is_replayed_chunk_by_chunk(encoder_dropout):
    """With dropout on, the graph-building second pass must see the masks of the first (RNG restored per
    chunk): the cached gradient then equals that of chunk-wise forwards with a graph under the same seed."""
    model, tokenizer = encoder_dropout
    model.train()
    roles = ("anchor", "positive", "negative")
    ids, mask = batch(tokenizer, roles)
    m = 4

    def loss_fn(embeddings):
        return mnr_loss(*split_roles(embeddings, len(roles)))

    def chunked_reference(seed):
        torch.manual_seed(seed)
        embeddings = []
        for chunk_ids, chunk_mask in zip(ids.split(m), mask.split(m)):
            length = int(chunk_mask.sum(dim=1).max())  # the same trimming as the cached pass
            embeddings.append(model(chunk_ids[:, :length], chunk_mask[:, :length]))
        loss_fn(torch.cat(embeddings)).backward()
        return grads(model)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    cached_loss_and_backward(model, ids, mask, m, loss_fn)
    cached = grads(model)
    assert max_diff(cached, chunked_reference(5)) < 1e-5
    assert max_diff(cached, chunked_reference(6)) > 1e-4  # dropout really is on: another seed, another gradient


def test_cached_gradient_equals_uncached_with_left_padding():
    """A tokenizer that pads on the left (many decoders' do; the collator follows it): each chunk drops the
    padding columns it does not need at the front, never real tokens at the end."""
    from tiny_decoders import cached_decoder

    model, tokenizer = load_encoder(str(cached_decoder("qwen2")))
    tokenizer.padding_side = "left"
    model.train()
    roles = ("anchor", "positive", "negative")
    ids, mask = batch(tokenizer, roles)
    assert (mask[:, 0] == 0).any()  # some rows really are padded on the left

    def loss_fn(embeddings):
        parts = split_roles(embeddings, len(roles))
        return mnr_loss(parts[0], parts[1], parts[2:])

    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(ids, mask))
    loss.backward()
    uncached = grads(model)
    cached_loss_and_backward(model, ids, mask, 4, loss_fn)
    cached = grads(model)
    grad_max = max(float(g.abs().max()) for g in uncached)
    assert grad_max > 1e-3
    assert max_diff(cached, uncached) < tolerance(grad_max)
