"""The unpadded forward (mnr.unpadded) gives the padded forward's embeddings and parameter gradients (1e-5, fp32)
for tiny BERT, RoBERTa, XLM-RoBERTa and decoder (Llama, Qwen2, Mistral) models (every family of
mnr.unpadded.VERIFIED), alone, under GradCache and under 2-process gathering."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertModel, LlamaConfig, LlamaModel, MistralConfig, MistralModel, MPNetConfig,
                          MPNetModel, Qwen2Config, Qwen2Model, RobertaConfig, RobertaModel, XLMRobertaConfig,
                          XLMRobertaModel)

from mnr.gradcache import cached_loss_and_backward
from mnr.loss import mnr_loss, split_roles
from mnr.model import POOLINGS
from mnr.unpadded import (BACKEND, VERIFIED, UnpaddedEncoder, UnpaddedError, flatten, pool_flat, prepare_unpadded,
                          supports_unpadded, unpadded_embed)
from sync_counter import count_syncs

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
             max_position_embeddings=64)
ENCODER = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DECODER = dict(num_key_value_heads=2, attention_dropout=0.0)  # grouped-query attention: 4 query heads, 2 kv heads
FAMILIES = {
    "bert": lambda: BertModel(BertConfig(**SMALL, **ENCODER), add_pooling_layer=False),
    "roberta": lambda: RobertaModel(RobertaConfig(**SMALL, **ENCODER, pad_token_id=1), add_pooling_layer=False),
    "xlm-roberta": lambda: XLMRobertaModel(XLMRobertaConfig(**SMALL, **ENCODER, pad_token_id=1),
                                           add_pooling_layer=False),
    "llama": lambda: LlamaModel(LlamaConfig(**SMALL, **DECODER)),
    "qwen2": lambda: Qwen2Model(Qwen2Config(**SMALL, **DECODER)),
    "mistral": lambda: MistralModel(MistralConfig(**SMALL, **DECODER, sliding_window=None)),
}


def batch(n: int = 6, longest: int = 11, pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n right-padded rows of random ids (never the pad id) with lengths 1..longest, the longest row included."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=gen)
    lengths[0] = longest
    mask = (torch.arange(longest)[None] < lengths[:, None]).long()
    ids = torch.randint(3, SMALL["vocab_size"], (n, longest), generator=gen)
    return ids.masked_fill(mask == 0, pad), mask


def models(family: str):
    """(padded reference on sdpa, the same weights prepared for the unpadded path)."""
    torch.manual_seed(0)
    padded = FAMILIES[family]()
    padded.set_attn_implementation("sdpa")
    unpadded = copy.deepcopy(padded)
    assert prepare_unpadded(unpadded) is None
    return padded, unpadded


def pad_id(model) -> int:
    return model.config.pad_token_id or 0


def padded_embed(model, ids, mask, pooling):
    return POOLINGS[pooling](model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b):
    """1e-5 for gradients up to 2; float32 rounding grows with the gradient (as in tests/test_gradcache.py)."""
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5 * max(1.0, float(y.abs().max()) / 2), rtol=0)


def test_every_family_called_verified_is_tested_here():
    assert sorted(FAMILIES) == sorted(VERIFIED)


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_unpadded_embeddings_and_gradients_equal_the_padded_forward(family, pooling):
    padded, unpadded = models(family)
    ids, mask = batch(pad=pad_id(padded))
    weights = torch.randn(ids.shape[0], SMALL["hidden_size"], generator=torch.Generator().manual_seed(1))
    ref = padded_embed(padded, ids, mask, pooling)
    (ref * weights).sum().backward()
    got = unpadded_embed(unpadded.train(), flatten(ids, mask), pooling)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert_same_grads(grads(unpadded), grads(padded))


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_a_model_on_the_varlen_backend_still_runs_padded_batches_as_sdpa(family):
    padded, unpadded = models(family)
    assert unpadded.config._attn_implementation == BACKEND
    ids, mask = batch(pad=pad_id(padded), seed=3)
    torch.testing.assert_close(padded_embed(unpadded, ids, mask, "mean"), padded_embed(padded, ids, mask, "mean"),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("mini_batch_size", [1, 4, 5])
@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_gradcache_on_the_unpadded_path_gives_the_plain_padded_gradient(family, mini_batch_size):
    padded, unpadded = models(family)
    ids, mask = batch(n=12, pad=pad_id(padded), seed=5)  # 6 anchors then 6 positives

    def loss_fn(embeddings):
        anchors, positives = split_roles(embeddings, 2)
        return mnr_loss(anchors, positives)

    loss = loss_fn(padded_embed(padded, ids, mask, "mean"))
    loss.backward()
    cached = cached_loss_and_backward(UnpaddedEncoder(unpadded, "mean"), ids, mask, mini_batch_size, loss_fn)
    torch.testing.assert_close(cached, loss.detach(), atol=1e-5, rtol=0)
    assert_same_grads(grads(unpadded), grads(padded))


def test_flatten_restarts_positions_per_segment_on_either_padding_side():
    ids = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 4, 0]])
    mask = (ids != 0).long()
    flat = flatten(ids, mask)
    assert flat.ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    assert flat.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert flat.cu_seqlens.tolist() == [0, 3, 4, 6] and flat.cu_seqlens.dtype == torch.int32
    assert (flat.max_len, flat.lengths.tolist()) == (3, [3, 1, 2])
    left = flatten(torch.tensor([[5, 6, 7], [0, 0, 8], [0, 9, 4]]), torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))
    assert (left.ids.tolist(), left.position_ids.tolist()) == (flat.ids.tolist(), flat.position_ids.tolist())
    with pytest.raises(UnpaddedError, match="without tokens"):
        flatten(ids, torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]))


def test_roberta_positions_start_after_the_padding_index():
    """RoBERTa numbers positions from padding_idx + 1: the unpadded forward must too (else it matches nothing)."""
    padded, unpadded = models("roberta")
    ids, mask = batch(pad=1)
    flat = flatten(ids, mask)
    wrong = unpadded(input_ids=flat.ids, position_ids=flat.position_ids, cu_seq_lens_q=flat.cu_seqlens,
                     cu_seq_lens_k=flat.cu_seqlens, max_length_q=flat.max_len, max_length_k=flat.max_len)
    ref = padded_embed(padded, ids, mask, "mean")
    assert (pool_flat(wrong.last_hidden_state[0], flat, "mean") - ref).abs().max() > 1e-3
    torch.testing.assert_close(unpadded_embed(unpadded, flat, "mean"), ref, atol=1e-5, rtol=0)


def test_models_that_cannot_run_unpadded_say_why():
    mpnet = MPNetModel(MPNetConfig(**SMALL), add_pooling_layer=False)
    assert "mpnet" in supports_unpadded(mpnet)
    with pytest.raises(UnpaddedError, match="cannot run unpadded: model_type 'mpnet'"):
        UnpaddedEncoder(mpnet)
    window = MistralModel(MistralConfig(**SMALL, **DECODER, sliding_window=4))
    assert "sliding-window" in supports_unpadded(window)
    bert = BertModel(BertConfig(**SMALL, **ENCODER))
    with pytest.raises(UnpaddedError, match="call prepare_unpadded first"):
        unpadded_embed(bert, flatten(*batch()), "mean")


def test_the_unpadded_forward_of_a_flattened_batch_never_syncs_with_the_host():
    """flatten runs on the collator's CPU tensors; on the device, the transformer and the pooling need no sync."""
    _, unpadded = models("bert")
    flat = flatten(*batch())
    with count_syncs() as syncs:
        unpadded_embed(unpadded, flat, "mean").sum().backward()
    assert syncs.calls == []


@pytest.mark.slow
def test_two_processes_with_gathered_negatives_and_gradcache_match_one_padded_process(tmp_path):
    """tests/unpadded_dist_worker.py under 2 gloo processes (one launch, seconds of start-up)."""
    import json

    from test_distributed import MULTI_GPU, launch

    launch(MULTI_GPU, ["tests/unpadded_dist_worker.py", str(tmp_path / "out.json")], tmp_path)
    ranks = json.loads((tmp_path / "out.json").read_text())
    assert len(ranks) == 2
    for result in ranks:
        for family in ("bert", "llama"):
            r = result[family]
            assert r["cached_vs_single"] < 1e-5 * max(1.0, r["grad_max"] / 2), (family, r)
