"""The CUDA-free sync counter (tests/sync_counter.py) sees every value read of a tensor, and finds the per-step
syncs of the padded path: the length-bucket widths, transformers' padding-mask check, `_check_step`'s flags."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

from mnr.model import Encoder
from mnr.train import _check_step
from sync_counter import count_syncs

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def test_every_value_read_counts_once_and_the_patch_is_undone():
    t = torch.tensor([1.5])
    original = torch.Tensor.item
    with count_syncs() as syncs:
        t.item(), t.tolist(), bool(t), int(t), float(t), t.cpu(), t.numpy(), [0, 1][torch.tensor(1)]
        if t > 1:
            pass
        torch.ones(3) * 2  # device work that reads no value: no sync
    assert syncs.calls == ["item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "__index__",
                           "__bool__"]
    assert all("test_sync_counter.py:" in w for w in syncs.where)  # the caller, not the patch
    assert torch.Tensor.item is original


def test_the_padded_forward_and_the_step_check_sync_today():
    """What the unpadded path and a deferred step check remove (see tests/test_unpadded.py for the unpadded path)."""
    ids = torch.randint(3, 100, (8, 10))
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[1:, 7:] = 0
    encoder = Encoder(BertModel(BertConfig(**SMALL), add_pooling_layer=False), length_buckets=2)
    with count_syncs() as syncs:
        encoder(ids, mask).sum().backward()
    widths = [w for call, w in zip(syncs.calls, syncs.where) if call == "tolist"]
    assert len(widths) == 1 and "mnr/model.py:" in widths[0]  # the bucket widths
    assert any("masking_utils.py" in w for w in syncs.where)  # transformers checks the padding mask per call
    with count_syncs() as syncs:
        _check_step(torch.tensor(1.0), torch.tensor(2.0), 0)
    assert syncs.calls == ["tolist"]  # distributed.any_true: once per step
