"""Deferred step checks (mnr.stepcheck): a non-finite step leaves weights and optimizer state bit-identical
without a host sync; finite steps are plain fused-AdamW steps; the flags are read once, at the log step."""

from __future__ import annotations

import copy

import pytest
import torch

from mnr.stepcheck import StepFlags
from sync_counter import count_syncs


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01, fused=True)


def backward(model, x):
    loss = model(x).pow(2).sum()
    loss.backward()
    return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    (wa, oa), (wb, ob) = a, b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for key, state in oa["state"].items():
        assert all(torch.equal(v, ob["state"][key][n]) for n, v in state.items())


def test_a_nonfinite_step_is_skipped_on_the_device_and_counted_at_the_log_step():
    model, opt = setup()
    ref_model, ref_opt = setup()
    flags = StepFlags("cpu")
    batches = [torch.randn(2, 4), torch.tensor([[float("nan")] * 4] * 2), torch.randn(2, 4), torch.randn(2, 4)]
    with count_syncs() as syncs:
        for step, x in enumerate(batches):
            before = snapshot(model, opt)
            loss, norm = backward(model, x)
            flags.guard(opt, loss, norm, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 1:
                assert_same(snapshot(model, opt), before)  # weights, moments and step count untouched
    assert syncs.calls == []
    for x in batches[:1] + batches[2:]:  # the reference never saw the bad batch
        backward(ref_model, x)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt))
    with count_syncs() as syncs:
        assert flags.read() == (1, 1, False)
    assert len(syncs) == 1
    assert flags.read(stop=True) == (0, None, True)


def test_the_flag_is_reduced_over_processes_and_an_unfused_optimizer_is_refused():
    model, opt = setup()
    flags = StepFlags("cpu", reduce_max=lambda flag: torch.ones_like(flag))  # another process saw inf
    backward(model, torch.randn(2, 4))
    opt.step()  # a plain first step: the state exists
    opt.zero_grad(set_to_none=True)
    loss, norm = backward(model, torch.randn(2, 4))
    before = snapshot(model, opt)
    assert float(flags.guard(opt, loss, norm, 7)) == 1.0
    opt.step()
    assert_same(snapshot(model, opt), before)
    assert flags.read() == (1, 7, True)  # the other process's stop reaches this one too
    with pytest.raises(ValueError, match=r"AdamW\(fused=None\) cannot skip a step on the device"):
        StepFlags("cpu").guard(torch.optim.AdamW(model.parameters()), loss, norm, 0)
