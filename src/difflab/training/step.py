"""The update half of a training step, kept on the device: backward, clipping, the non-finite-step gate, AdamW and
the EMAs -- with no host-device synchronisation inside the step.

A GPU runs behind the Python that feeds it. Reading one number back (``float(loss)``, ``if torch.isfinite(...)``)
makes the host wait until every queued kernel has run, so the next step's kernels are launched only after the GPU
went idle; for a small network that wait is most of the step. So the gate lives on the device:

* ``ok`` = the (all-reduced) loss and gradient norm are finite, and no earlier update of this window made a weight
  non-finite: one boolean tensor;
* AdamW is fused and gets ``found_inf = not ok`` (the flag ``torch.amp.GradScaler`` uses): a bad step leaves the
  weights, the moments and the step count untouched inside the kernel;
* the EMAs move by ``(1 - decay) * ok``: a bad step moves them by exactly zero;
* the loss and metric sums, the count of finite steps, which steps were bad and the non-finite steps in a row add up
  on the device.

The host reads all of it in one transfer in :meth:`Updater.check` -- at every log row, before every checkpoint,
evaluation or picture, and at the end: one synchronisation every ``log_every`` steps. Only then does it learn of
skipped steps, so the learning-rate schedule and the EMA warm-up (which count updates, not steps) count the updates
known at the last check; without skipped steps nothing changes.

Weights made non-finite by an update whose gradient was finite: AdamW cannot do that with a learning rate in (0, 1]
(its update is at most about the rate), a faulty kernel or another optimizer could. Each step checks its updated
weights on the device; from such an update on, every later step of the window is skipped and the EMAs stand still,
and the check puts the weights, the optimizer's moments and the EMAs back to the snapshot taken at the previous check
(``log_every`` steps back at most): the whole window counts as skipped. The snapshot costs the memory of the weights,
moments and EMAs once more, and a copy at each check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab import distributed


@dataclass
class Report:
    """What the device accumulated since the previous check (one window of steps)."""

    first: int                    # the step before the window (the previous check's)
    steps: int                    # steps in the window
    finite: int                   # of which finite (their loss and metrics are in ``sums``)
    sums: dict[str, float]        # "loss" and the task's metrics, summed over the finite steps (means over processes)
    grad_norm: float              # the window's last step (before clipping; mean over processes)
    bad: list[int]                # the numbers of the window's skipped steps
    bad_in_a_row: int             # non-finite steps in a row at the window's end (carried across windows)
    most_in_a_row: int            # the longest run of them that reached into the window
    undone: int | None            # the first step whose update made a weight non-finite (the window was undone)
    stop: bool                    # a process was asked to stop (Ctrl-C, SIGTERM)


class Updater:
    """Backward, clip, AdamW and EMAs for one network, gated on the device (see the module doc).

    ``step()`` queues one step and returns at once; ``check()`` is the one place that waits for the device."""

    def __init__(self, net: nn.Module, emas: dict[str, nn.Module], decays: dict[str, float],
                 optimizer: torch.optim.Optimizer, *, grad_clip: float, world_size: int = 1, first_step: int = 0):
        self.params, self.buffers = list(net.parameters()), list(net.buffers())
        self.emas, self.decays, self.optimizer = emas, decays, optimizer
        self.ema_params = {name: list(ema.parameters()) for name, ema in emas.items()}
        self.clip, self.world = (grad_clip if grad_clip > 0 else math.inf), world_size
        self.device = self.params[0].device
        self._saved: list[torch.Tensor] | None = None
        self.names: list[str] | None = None        # "loss" and the task's metrics, fixed by the first step
        self.bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self._snapshot_due = True  # taken just before the next step: after whatever the loop does between steps
        self._new_window(first_step)

    def _new_window(self, first_step: int) -> None:
        zeros = dict(device=self.device)
        self.first, self.n = first_step, 0
        self.sums = torch.zeros(len(self.names or ()), dtype=torch.float64, **zeros)
        self.finite = torch.zeros((), dtype=torch.int64, **zeros)
        self.flags = torch.zeros(64, dtype=torch.bool, **zeros)      # flags[i]: step first + 1 + i was skipped
        self.grad_norm = torch.full((), math.nan, **zeros)
        self.weights_bad = torch.zeros((), dtype=torch.bool, **zeros)
        self.undone_at = torch.full((), -1, dtype=torch.int64, **zeros)  # window index of a weight-breaking update
        self.run_at_start, self.most_run = self.bad_run.clone(), self.bad_run.clone()
        self.stop = torch.zeros((), **zeros)

    def step(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], *, lr: float, updates: int,
             stop_requested: bool = False) -> None:
        """One step from the mean ``loss`` (and per-example ``metrics``) of this process's share of the batch: the
        learning rate ``lr`` and ``updates`` (optimizer updates so far, for the EMA warm-up) are the host's."""
        if self._snapshot_due:
            self._snapshot()
        if self.names is None:
            self.names = ["loss", *metrics]
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over all processes
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.clip)
        # one small all-reduce per step (device to device): the loss, the gradient norm, the metrics, the stop flag
        values = [loss.detach().float(), grad_norm.float(), *(m.detach().float().mean() for m in metrics.values())]
        if self.world > 1:
            values.append(torch.full((), float(stop_requested), device=self.device))
        shared = distributed.all_reduce_(torch.stack(values), "sum")
        mean = shared[: len(self.names) + 1] / self.world  # loss, grad norm, metrics
        with torch.no_grad():
            ok = torch.isfinite(mean[0]) & torch.isfinite(mean[1]) & ~self.weights_bad
            self.optimizer.found_inf = (~ok).float()  # fused AdamW: no change at all where set
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            norms = torch._foreach_norm(self.params)
            weights_ok = torch.isfinite(torch.stack(norms)).all()
            self.undone_at = torch.where(~weights_ok & ~self.weights_bad & (self.undone_at < 0), self.n,
                                         self.undone_at)
            self.weights_bad |= ~weights_ok
            ok &= weights_ok
            gate = ok.float()
            for name, decay in self.decays.items():
                # EMA with a warm-up so short runs are not dominated by the initialisation; weight 0 for a bad step
                decay = min(decay, (1 + updates) / (10 + updates))
                torch._foreach_lerp_(self.ema_params[name], self.params, [gate * (1 - decay)] * len(self.params))
                for b_ema, b in zip(self.emas[name].buffers(), self.buffers):  # e.g. BatchNorm statistics
                    b_ema.copy_(torch.where(ok, b, b_ema))
            logged = torch.cat([mean[:1], mean[2:]]).double()
            self.sums += torch.where(ok, logged, torch.zeros_like(logged))
            self.finite += ok
            if self.n == len(self.flags):
                self.flags = torch.cat([self.flags, torch.zeros_like(self.flags)])
            self.flags[self.n] = ~ok
            self.bad_run = (self.bad_run + 1) * (~ok)
            self.most_run = torch.maximum(self.most_run, self.bad_run)
            self.grad_norm = mean[1]
            if self.world > 1:
                self.stop = shared[-1]
        self.n += 1

    def check(self) -> Report:
        """Wait for the device and report the window since the previous check; a window in which an update made a
        weight non-finite is undone. Then a new window starts (its snapshot is taken before its first step)."""
        n, k = self.n, len(self.names or ())
        counters = torch.stack([self.finite, self.run_at_start, self.bad_run, self.most_run, self.undone_at,
                                self.stop != 0]).double()
        packed = torch.cat([self.sums, counters, self.grad_norm.double().view(1), self.flags[:n].double()]).tolist()
        sums, counters, grad_norm, flags = packed[:k], packed[k: k + 6], packed[k + 6], packed[k + 7:]  # the one sync
        finite, run_at_start, bad_run, most_run, undone_at, stop = (int(v) for v in counters)
        bad = [self.first + 1 + i for i, f in enumerate(flags) if f]
        undone = None
        if undone_at >= 0:  # the whole window goes: weights, moments and EMAs as at its start
            undone = self.first + 1 + undone_at
            self._restore()
            bad, finite, sums = list(range(self.first + 1, self.first + n + 1)), 0, [0.0] * k
            bad_run = most_run = run_at_start + n
            self.bad_run.fill_(bad_run)
        report = Report(self.first, n, finite, dict(zip(self.names or (), sums)), grad_norm, bad, bad_run, most_run,
                        undone, bool(stop))
        self._snapshot_due = True
        self._new_window(self.first + n)
        return report

    @torch.no_grad()
    def _snapshot(self) -> None:
        """Copies of the weights, the EMAs and the optimizer's moments, to undo a window with (kept, refilled)."""
        self._snapshot_due = False
        self._had_state = [p in self.optimizer.state for p in self.params]
        live = self._undo_list()
        if self._saved is None or len(self._saved) != len(live):
            self._saved = [t.detach().clone() for t in live]
        else:
            torch._foreach_copy_(self._saved, live)

    def _undo_list(self) -> list[torch.Tensor]:
        """The weights, the EMAs' weights and buffers, and the moments of the parameters that had state then."""
        state = self.optimizer.state
        moments = [v for p, had in zip(self.params, self._had_state) if had
                   for v in state[p].values() if torch.is_tensor(v)]
        return [*self.params, *(t for ema in self.emas.values() for t in (*ema.parameters(), *ema.buffers())),
                *moments]

    @torch.no_grad()
    def _restore(self) -> None:
        torch._foreach_copy_(self._undo_list(), self._saved)
        for p, had in zip(self.params, self._had_state):
            if not had:  # no state at the snapshot (before the first update): none again
                self.optimizer.state.pop(p, None)
