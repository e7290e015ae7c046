"""MNR loss: one matmul equals the tutorial's per-anchor loop (values and gradients), hand-checked cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from mnr.loss import mnr_loss, ranking_loss, split_roles


def tutorial_loop(anchors, positives, negatives=None, scale=20.0):
    """The tutorial's loop: for each anchor, cosine similarity with every candidate, x scale, CrossEntropy."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    ce = torch.nn.CrossEntropyLoss()
    losses = []
    for i in range(anchors.shape[0]):
        scores = torch.stack([F.cosine_similarity(anchors[i], c, dim=0) for c in candidates]) * scale
        losses.append(ce(scores.unsqueeze(0), torch.tensor([i])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("with_negatives", [False, True])
def test_matches_tutorial_loop_values_and_gradients(with_negatives):
    g = torch.Generator().manual_seed(0)
    shape = (8, 16)
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3 if with_negatives else 2)]
    ours_in = [t.clone().requires_grad_() for t in tensors]
    loop_in = [t.clone().requires_grad_() for t in tensors]
    ours = mnr_loss(*ours_in, scale=20.0)
    loop = tutorial_loop(*loop_in, scale=20.0)
    assert abs(ours.item() - loop.item()) < 1e-6
    ours.backward()
    loop.backward()
    for a, b in zip(ours_in, loop_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), (a.grad - b.grad).abs().max()


def test_float32_matches_loop_to_1e_6():
    torch.manual_seed(1)
    a, p, n = torch.randn(32, 64), torch.randn(32, 64), torch.randn(32, 64)
    assert abs(mnr_loss(a, p, n).item() - tutorial_loop(a, p, n).item()) < 1e-5  # float32 rounding of 96 logits
    assert abs(mnr_loss(a.double(), p.double(), n.double()).item()
               - tutorial_loop(a.double(), p.double(), n.double()).item()) < 1e-6


def test_hand_checked_two_pairs():
    # anchors equal to their positives and orthogonal to the other: logits [[s, 0], [0, s]]
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # norms differ: cosine ignores them
    loss = mnr_loss(a, a.clone(), scale=2.0)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_scale_is_inverse_temperature():
    torch.manual_seed(2)
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    logits = (F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T) / 0.05
    assert mnr_loss(a, p, scale=20.0).item() == pytest.approx(F.cross_entropy(logits, torch.arange(4)).item(), rel=1e-6)


def test_symmetric_is_mean_of_both_directions():
    torch.manual_seed(3)
    a, p = torch.randn(6, 8), torch.randn(6, 8)
    both = (tutorial_loop(a, p) + tutorial_loop(p, a)) / 2
    assert mnr_loss(a, p, symmetric=True).item() == pytest.approx(both.item(), abs=1e-5)


def test_label_offset_selects_this_ranks_block():
    torch.manual_seed(4)
    q, c = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(9, 8), dim=-1)
    full = F.cross_entropy(20 * q @ c.T, torch.arange(3) + 3)
    assert ranking_loss(q, c, 20.0, label_offset=3).item() == pytest.approx(full.item(), rel=1e-6)


def test_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        mnr_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_split_roles_checks_shape():
    assert [t.shape[0] for t in split_roles(torch.randn(9, 2), 3)] == [3, 3, 3]
    with pytest.raises(ValueError):
        split_roles(torch.randn(7, 2), 3)


def test_matryoshka_is_the_weighted_sum_of_the_loss_at_each_truncation_renormalised():
    torch.manual_seed(3)
    a, p, n = (torch.randn(6, 12, dtype=torch.float64) for _ in range(3))
    expected = sum(w * tutorial_loop(a[:, :d], p[:, :d], n[:, :d]) for d, w in [(12, 1.0), (6, 0.5), (3, 2.0)])
    got = mnr_loss(a, p, n, dims=(12, 6, 3), dim_weights=(1.0, 0.5, 2.0))
    assert abs(got.item() - expected.item()) < 1e-9
    # a truncation is re-normalised: scaling the kept coordinates of one row changes nothing
    b = a.clone()
    b[0, :3] *= 7.0
    assert abs(mnr_loss(b, p, n, dims=(3,)).item() - mnr_loss(a, p, n, dims=(3,)).item()) < 1e-9
    # default weights are 1, and one full-size dim is the plain loss
    assert abs(mnr_loss(a, p, dims=(12, 6)).item() - (mnr_loss(a[:, :12], p) + mnr_loss(a[:, :6], p[:, :6])).item()) < 1e-9
    assert mnr_loss(a, p, n, dims=(12,)).item() == mnr_loss(a, p, n).item()
    with pytest.raises(ValueError, match="dim_weights"):
        mnr_loss(a, p, dims=(12, 6), dim_weights=(1.0,))
