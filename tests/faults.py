"""Faults injected into the one training loop by the safety tests: a loss that turns NaN, an update that breaks a
weight."""

from __future__ import annotations

import torch


def nan_task(task_class, bad_calls: set[int]):
    """``task_class`` with a loss that turns NaN at the given calls (counted from 1): a fake objective injected
    into the one training loop."""
    calls = {"n": 0}

    class WithNaNs(task_class):
        def loss(self, net, batch):
            calls["n"] += 1
            out, metrics = super().loss(net, batch)
            return (out * float("nan") if calls["n"] in bad_calls else out), metrics

    return WithNaNs


def break_a_weight(monkeypatch, at_call: int, value: float = float("inf")) -> None:
    """Make AdamW's ``at_call``-th step (counted from 1) leave one weight at ``value``, as a faulty kernel or a future
    optimizer might: AdamW with a valid learning rate cannot overflow a weight."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def faulty_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = value
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", faulty_step)
