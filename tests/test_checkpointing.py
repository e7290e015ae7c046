"""mnr.checkpointing: the gradient with checkpointing equals the gradient without it (BERT and Qwen2, full and
LoRA), and under GradCache with dropout on the cached gradient is still the exact one."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from mnr.checkpointing import enable_gradient_checkpointing, is_checkpointing
from mnr.decoder import ensure_pad_token
from mnr.gradcache import cached_loss_and_backward
from mnr.loss import mnr_loss, split_roles
from mnr.model import load_encoder
from tiny_decoders import cached_decoder

ANCHORS = [f"a man {i} is playing with the dog near the house" for i in range(6)]
POSITIVES = [f"the person {i} plays outside" for i in range(6)]


def tiny(kind, tmp_path_factory, dropout=0.0):
    if kind == "bert":
        return str(build_tiny_model(tmp_path_factory.mktemp("ckpt-bert") / "m", dropout=dropout))
    return str(cached_decoder("qwen2", dropout=dropout))


def encoder_of(path, kind, lora):
    encoder, tokenizer = load_encoder(path)
    ensure_pad_token(tokenizer)
    encoder.pipeline.pooling = "mean" if kind == "bert" else "lasttoken"
    if lora:
        from mnr.lora import LoraSettings, apply_lora

        encoder.transformer = apply_lora(encoder.transformer, LoraSettings(r=4, alpha=8))
        torch.manual_seed(1)
        with torch.no_grad():  # B = 0 at the start would leave A without gradient
            for name, p in encoder.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return encoder.train(), tokenizer


def batch(tokenizer):
    enc = tokenizer(ANCHORS + POSITIVES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def loss_fn(embeddings):
    return mnr_loss(*split_roles(embeddings, 2))


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def max_diff(a, b) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_checkpointing_leaves_the_gradient_unchanged(kind, lora, tmp_path_factory):
    if lora:
        pytest.importorskip("peft")
    encoder, tokenizer = encoder_of(tiny(kind, tmp_path_factory), kind, lora)
    ids, mask = batch(tokenizer)
    loss_fn(encoder(ids, mask)).backward()
    plain = grads(encoder)
    enable_gradient_checkpointing(encoder.transformer, lora=lora)
    assert is_checkpointing(encoder.transformer)
    loss_fn(encoder(ids, mask)).backward()
    checkpointed = grads(encoder)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert set(plain) == trainable  # every trainable parameter got its gradient, the adapter's under LoRA
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-3
    assert max_diff(checkpointed, plain) < 1e-6


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_gradcache_with_checkpointing_replays_dropout_exactly(kind, lora, tmp_path_factory):
    """Dropout on: the checkpointed GradCache step equals chunk-wise forwards with a graph and no
    checkpointing under the same seed (the RNG replay of GradCache and of the recompute agree)."""
    if lora:
        pytest.importorskip("peft")
    encoder, tokenizer = encoder_of(tiny(kind, tmp_path_factory, dropout=0.1), kind, lora)
    ids, mask = batch(tokenizer)
    m = 4

    def chunked_reference(seed):
        torch.manual_seed(seed)
        embeddings = []
        for chunk_ids, chunk_mask in zip(ids.split(m), mask.split(m)):
            width = int(chunk_mask.sum(dim=1).max())  # the cached pass's trimming
            embeddings.append(encoder(chunk_ids[:, :width], chunk_mask[:, :width]))
        loss_fn(torch.cat(embeddings)).backward()
        return grads(encoder)

    reference, other_seed = chunked_reference(5), chunked_reference(6)
    enable_gradient_checkpointing(encoder.transformer, lora=lora)
    torch.manual_seed(5)
    cached_loss_and_backward(encoder, ids, mask, m, loss_fn)
    cached = grads(encoder)
    assert max_diff(cached, reference) < 1e-5
    assert max_diff(other_seed, reference) > 1e-4  # dropout really is on


def test_a_model_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match="Linear does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
