"""The clocks of benchmarks/throughput.py: training steps timed epoch by epoch (EpochClock), one
epoch under torch.profiler (StepProfile), and the Lightning callback that drives a clock from the
litlab side. A hand loop calls clock.start / step / stop itself."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochClock:
    """Sums the time of the training steps of each epoch from `warmup_epochs` on: from the start of
    its first step to the end of its last one (a device sync at both ends); keeps each such epoch's
    rate too (`epoch_rates`: the best epoch is the least disturbed by the host's other work)."""

    def __init__(self, warmup_epochs: int, clock: str = "wall", profile_epoch: int | None = None):
        self.warmup_epochs = warmup_epochs
        self.profile_epoch = profile_epoch  # an untimed epoch run under torch.profiler (--profile)
        self.profile: dict[str, float] | None = None  # per step of that epoch, see StepProfile
        self._profiler: StepProfile | None = None
        # wall: perf_counter; cpu: this thread's CPU time (steadier on a loaded CPU-only machine,
        # but blind to time spent waiting, e.g. for other threads holding the GIL)
        self.now = time.perf_counter if clock == "wall" else time.thread_time
        self.seconds = 0.0
        self.steps = 0
        self.samples = 0
        self.epoch_rates: list[float] = []  # samples/s of each timed epoch
        self._t0 = None
        self._epoch_samples = 0

    def start(self, epoch: int, device) -> None:
        if epoch == self.profile_epoch:
            self._profiler = StepProfile(device)
        if epoch >= self.warmup_epochs:
            sync(device)
            self._t0, self._epoch_samples = self.now(), 0

    def step(self, samples: int) -> None:
        if self._profiler is not None:
            self._profiler.steps += 1
        if self._t0 is not None:
            self.steps += 1
            self.samples += samples
            self._epoch_samples += samples

    def stop(self, device) -> None:
        if self._profiler is not None:
            self.profile, self._profiler = self._profiler.finish(), None
        if self._t0 is not None:
            sync(device)
            seconds = self.now() - self._t0
            self.seconds += seconds
            if seconds > 0:
                self.epoch_rates.append(self._epoch_samples / seconds)
            self._t0 = None


class StepProfile:
    """One epoch under torch.profiler, per training step: `wall_ms`; `in_ops_ms`, the host's time
    inside torch ops (self CPU time: on a GPU, launching kernels); `device_busy_ms`, the GPU's time
    in kernels. wall - in_ops is the Python around the ops (the framework's share); on a GPU, a
    device_busy well under wall means the host, not the GPU, sets the pace. The profiler's own cost
    per op inflates wall and in_ops alike on both sides: compare the sides, not the absolute values."""

    def __init__(self, device: torch.device):
        from torch.profiler import ProfilerActivity, profile

        cuda = device.type == "cuda"
        self.device, self.steps = device, 0
        sync(device)
        self.prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def finish(self) -> dict[str, float]:
        sync(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        n = max(self.steps, 1)
        out = {"steps": self.steps, "wall_ms": 1e3 * wall / n,
               "in_ops_ms": sum(e.self_cpu_time_total for e in events) / 1e3 / n}  # us -> ms
        if self.device.type == "cuda":
            out["device_busy_ms"] = sum(e.self_device_time_total for e in events) / 1e3 / n
        # calls per step of each op (and the host's time in it): what one side does that the other does not
        out["ops"] = {e.key: [round(e.count / n, 3), round(e.self_cpu_time_total / 1e3 / n, 4)] for e in events}
        return out


def lightning_clock_callback(clock: EpochClock, samples_of: Callable[[Any], int]):
    import lightning as L

    class ClockCallback(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                clock.start(trainer.current_epoch, pl_module.device)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step(samples_of(batch))
            if batch_idx == trainer.num_training_batches - 1:
                clock.stop(pl_module.device)

    return ClockCallback()
