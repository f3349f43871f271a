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
* the optimizer updates so far count on the device too (``+ ok``), and the learning-rate schedule and the EMA
  warm-up read that count there: a skipped step is no schedule step, exactly as if the host had looked;
* the loss and metric sums, the count of finite steps, which steps were bad and the non-finite steps in a row add up
  on the device.

The host reads all of it in one transfer in :meth:`Updater.check` -- at every log row, before every checkpoint,
evaluation or picture, and at the end: one synchronisation every ``log_every`` steps. Under torchrun the stop flag
(Ctrl-C, SIGTERM) is read one step late from pinned memory, so every process stops at the same step while one step
stays queued.

Weights made non-finite by an update whose gradient was finite: AdamW cannot do that with a learning rate in (0, 1]
(its update is at most about the rate), a faulty kernel or another optimizer could. Each step checks its updated
weights on the device; from such an update on, every later step of the window is skipped, and the check puts the
weights, the optimizer's moments, the EMAs and the update count back to the snapshot taken at the previous check
(``log_every`` steps back at most): the whole window is undone and counts as skipped (its finite steps are not
counted as non-finite ones in a row). The snapshot costs the memory of the weights, moments and EMAs once more, and
a copy at each check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from difflab import distributed


@dataclass
class Report:
    """What the device accumulated since the previous check (one window of steps)."""

    first: int                    # the step before the window (the previous check's)
    steps: int                    # steps in the window
    finite: int                   # of which finite and kept (their loss and metrics are in ``sums``)
    sums: dict[str, float]        # "loss" and the task's metrics, summed over those (means over processes)
    grad_norm: float              # the window's last step (before clipping; mean over processes)
    lr: float                     # the learning rate of the window's last step
    bad: list[int]                # the numbers of the window's non-finite steps, skipped
    rolled_back: list[int]        # the other steps of a window undone for a weight-breaking update (skipped too)
    bad_in_a_row: int             # non-finite steps in a row at the window's end (carried across windows)
    most_in_a_row: int            # the longest run of them that reached into the window
    undone: int | None            # the first step whose update made a weight non-finite (the window was undone)


class Updater:
    """Backward, clip, AdamW and EMAs for one network, gated on the device (see the module doc).

    ``step()`` queues one step and returns at once; ``check()`` is the one place that waits for the device.
    ``lr_schedule`` maps the optimizer updates so far (a float64 tensor on the device) to the learning rate;
    ``updates`` is that count at the start (a resumed run's steps minus its skipped ones)."""

    def __init__(self, net: nn.Module, emas: dict[str, nn.Module], decays: dict[str, float],
                 optimizer: torch.optim.Optimizer, *, lr_schedule: Callable[[torch.Tensor], torch.Tensor],
                 grad_clip: float, updates: int = 0, world_size: int = 1, first_step: int = 0):
        self.params = list(net.parameters())
        self.buffers = list(net.buffers())
        self.emas, self.decays, self.optimizer, self.lr_schedule = emas, decays, optimizer, lr_schedule
        self.ema_params = {name: list(ema.parameters()) for name, ema in emas.items()}
        self.clip, self.world = (grad_clip if grad_clip > 0 else math.inf), world_size
        self.device = self.params[0].device
        self.base_lr = [group["lr"] for group in optimizer.param_groups]  # floats again after each step (JSON)
        self.updates = torch.full((), float(updates), dtype=torch.float64, device=self.device)
        self.names: list[str] | None = None        # "loss" and the task's metrics, fixed by the first step
        self.bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.stop_seen = False  # under torchrun: the stop flag of the previous step, the same on every process
        self._stop_host = torch.zeros((), pin_memory=self.device.type == "cuda")
        self._stop_event = None
        self._saved: list[torch.Tensor] | None = None
        self._snapshot_due = True  # taken just before the next step: after whatever the loop does between steps
        self._new_window(first_step)

    def _new_window(self, first_step: int) -> None:
        zeros = dict(device=self.device)
        self.first, self.n = first_step, 0
        self.sums = torch.zeros(len(self.names or ()), dtype=torch.float64, **zeros)
        self.finite = torch.zeros((), dtype=torch.int64, **zeros)
        self.flags = torch.zeros(64, dtype=torch.bool, **zeros)      # flags[i]: step first + 1 + i was skipped
        self.grad_norm = torch.full((), math.nan, **zeros)
        self.lr = torch.full((), math.nan, dtype=torch.float64, **zeros)
        self.weights_bad = torch.zeros((), dtype=torch.bool, **zeros)
        self.undone_at = torch.full((), -1, dtype=torch.int64, **zeros)  # window index of a weight-breaking update
        self.run_at_start, self.most_run = self.bad_run.clone(), self.bad_run.clone()

    def step(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], stop_requested: bool = False) -> None:
        """One step from the mean ``loss`` (and per-example ``metrics``) of this process's share of the batch."""
        if self._snapshot_due:
            self._snapshot()
        if self.names is None:
            self.names = ["loss", *metrics]
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
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
            self.lr = self.lr_schedule(self.updates)  # float64, as logged
            lr = self.lr.float()  # a device tensor: fused AdamW reads it there
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.found_inf = (~ok).float()  # fused AdamW: no change at all where set
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
                for group, base in zip(self.optimizer.param_groups, self.base_lr):
                    group["lr"] = base
            weights_ok = torch.isfinite(torch.stack(torch._foreach_norm(self.params))).all()
            self.undone_at = torch.where(~weights_ok & ~self.weights_bad & (self.undone_at < 0), self.n,
                                         self.undone_at)
            self.weights_bad |= ~weights_ok
            ok &= weights_ok
            for name, decay in self.decays.items():
                # EMA with a warm-up so short runs are not dominated by the initialisation, moved by zero for a bad
                # step: ema += (1 - decay) * ok * (w - ema), three multi-tensor ops
                decay = torch.clamp((1 + self.updates) / (10 + self.updates), max=decay)
                delta = torch._foreach_sub(self.params, self.ema_params[name])
                torch._foreach_mul_(delta, ((1 - decay) * ok).float())
                torch._foreach_add_(self.ema_params[name], delta)
                for b_ema, b in zip(self.emas[name].buffers(), self.buffers):  # e.g. BatchNorm statistics
                    b_ema.copy_(torch.where(ok, b, b_ema))
            self.updates += ok
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
                self._read_stop(shared[-1])
        self.n += 1

    def _read_stop(self, flag: torch.Tensor) -> None:
        """Under torchrun: ``stop_seen`` becomes the previous step's shared stop flag, copied to pinned memory while
        this step runs (on a CPU, where nothing runs ahead, this step's)."""
        if self.device.type != "cuda":
            self.stop_seen = bool(flag > 0)
            return
        if self._stop_event is not None:
            self._stop_event.synchronize()  # the previous step's all-reduce is done; this step is still queued
            self.stop_seen = bool(self._stop_host > 0)
        self._stop_host.copy_(flag, non_blocking=True)
        self._stop_event = torch.cuda.Event()
        self._stop_event.record()

    def check(self) -> Report:
        """Wait for the device and report the window since the previous check; a window in which an update made a
        weight non-finite is undone. Then a new window starts (its snapshot is taken before its first step)."""
        n, k = self.n, len(self.names or ())
        counters = torch.stack([self.finite, self.run_at_start, self.bad_run, self.most_run, self.undone_at]).double()
        packed = torch.cat([self.sums, counters, self.grad_norm.double().view(1), self.lr.double().view(1),
                            self.flags[:n].double()]).tolist()  # the one sync
        sums, counters, grad_norm, lr, flags = packed[:k], packed[k: k + 5], packed[k + 5], packed[k + 6], packed[k + 7:]
        finite, run_at_start, bad_run, most_run, undone_at = (int(v) for v in counters)
        steps = range(self.first + 1, self.first + n + 1)
        bad, rolled_back = [s for s, f in zip(steps, flags) if f], []
        undone = None
        if undone_at >= 0:  # the whole window goes: weights, moments, EMAs and the update count as at its start
            undone = self.first + 1 + undone_at
            self._restore()
            # one bad step (the breaking update; the steps after it only ran on broken weights), the rest undone
            bad, rolled_back, finite, sums = [undone], [s for s in steps if s != undone], 0, [0.0] * k
            bad_run = most_run = (run_at_start if undone_at == 0 else 0) + 1
            self.bad_run.fill_(bad_run)
        report = Report(self.first, n, finite, dict(zip(self.names or (), sums)), grad_norm, lr, bad, rolled_back,
                        bad_run, most_run, undone)
        self._snapshot_due = True
        self._new_window(self.first + n)
        return report

    @torch.no_grad()
    def _snapshot(self) -> None:
        """Copies of the weights, buffers, EMAs, update count and optimizer moments, to undo a window with (kept,
        refilled)."""
        self._snapshot_due = False
        self._had_state = [p in self.optimizer.state for p in self.params]
        live = self._undo_list()
        if self._saved is None or len(self._saved) != len(live):
            self._saved = [t.detach().clone() for t in live]
        else:
            torch._foreach_copy_(self._saved, live)

    def _undo_list(self) -> list[torch.Tensor]:
        """The weights and buffers, the EMAs' weights and buffers, the update count, and the moments of the
        parameters that had optimizer state at the snapshot."""
        state = self.optimizer.state
        moments = [v for p, had in zip(self.params, self._had_state) if had
                   for v in state[p].values() if torch.is_tensor(v)]
        return [*self.params, *self.buffers,
                *(t for ema in self.emas.values() for t in (*ema.parameters(), *ema.buffers())), self.updates,
                *moments]

    @torch.no_grad()
    def _restore(self) -> None:
        torch._foreach_copy_(self._undo_list(), self._saved)
        for p, had in zip(self.params, self._had_state):
            if not had:  # no state at the snapshot (before the first update): none again
                self.optimizer.state.pop(p, None)
