"""What a training run shows while it trains, on stderr (stdout keeps the result summary).

- On a terminal: `LitlabProgressBar`, a rich bar per epoch with batches done, elapsed and remaining
  time of the epoch, the whole fit's ETA, and throughput (steps/s and samples/s). It reads the
  logged metrics (which costs a host sync per metric) only every `metrics_every` steps and at the
  end of each epoch and validation; Lightning's own RichProgressBar reads them after every step.
- Not on a terminal (piped, CI, a notebook): `EpochLines`, at most one compact line per epoch
  (throttled to one every `min_interval` seconds, the last epoch always), no bar noise.
- `litlab run --quiet` and sweep trials: nothing.

`progress_callbacks(enabled, terminal)` picks one; the runner adds it to the Trainer's callbacks and
sets `enable_progress_bar` to `has_bar(...)` (Lightning refuses a bar callback otherwise).
"""

from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from rich.progress import ProgressColumn
from rich.text import Text

from litlab.durations import fmt_duration


def batch_size(batch) -> int | None:
    """Samples in a batch from shapes alone (no host sync): the first tensor's leading size, or a
    graph batch's num_graphs; None when unknown."""
    if hasattr(batch, "num_graphs"):
        return int(batch.num_graphs)
    if hasattr(batch, "shape"):
        return int(batch.shape[0]) if len(batch.shape) else None
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return None


class FitClock:
    """Throughput and fit-wide ETA from wall time and step counters (plain ints: no sync)."""

    def __init__(self):
        self.start = self.total_steps = None
        self.steps = self.samples = self.sized_steps = self.first_step = 0  # steps: training_step calls

    def begin(self, trainer) -> None:
        self.start = time.monotonic()
        self.steps = self.samples = self.sized_steps = 0
        self.first_step = trainer.global_step
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # a loader of unknown length (or none): no ETA, throughput still shown
            total = math.inf
        self.total_steps = total if math.isfinite(total) else None

    def step(self, batch) -> None:
        self.steps += 1
        n = batch_size(batch)
        if n is not None:
            self.samples += n
            self.sized_steps += 1

    def rates(self) -> tuple[float | None, float | None]:
        """(steps/s, samples/s) since the fit started."""
        if self.start is None or self.steps == 0:
            return None, None
        elapsed = max(time.monotonic() - self.start, 1e-9)
        samples = self.samples / elapsed if self.sized_steps else None
        return self.steps / elapsed, samples

    def eta(self, trainer) -> float | None:
        """Seconds left in the fit at the mean pace so far (validation time included)."""
        if self.start is None or self.total_steps is None:
            return None
        done = trainer.global_step - self.first_step
        if done <= 0:
            return None
        left = max(self.total_steps - trainer.global_step, 0)
        return (time.monotonic() - self.start) / done * left


class ThroughputColumn(ProgressColumn):
    """`12.3 steps/s  790 samples/s  fit ETA 0:01:02` on the training bar only."""

    def __init__(self, bar: LitlabProgressBar):
        self.bar = bar
        super().__init__()

    def render(self, task) -> Text:
        bar = self.bar
        trainer = getattr(bar, "_trainer", None)
        if bar.train_progress_bar_id != task.id or trainer is None or not trainer.training:
            return Text("")
        steps, samples = bar.clock.rates()
        parts = [f"{steps:.1f} steps/s" if steps else "- steps/s"]
        if samples:
            parts.append(f"{samples:,.0f} samples/s")
        parts.append(f"fit ETA {fmt_duration(bar.clock.eta(trainer))}")
        return Text("  ".join(parts), style="cyan")


class LitlabProgressBar(RichProgressBar):
    """Lightning's RichProgressBar (epoch, batches, elapsed • epoch ETA) plus throughput and a
    fit-wide ETA, reading metrics only every `metrics_every` steps. Draws on stderr."""

    def __init__(self, metrics_every: int = 50, refresh_rate: int = 4, console_kwargs: dict | None = None):
        super().__init__(refresh_rate=refresh_rate, console_kwargs={"stderr": True, **(console_kwargs or {})})
        self.metrics_every = max(1, metrics_every)
        self.clock = FitClock()

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        columns = [c for c in columns if type(c).__name__ != "ProcessingSpeedColumn"]  # it/s: replaced
        return [*columns, ThroughputColumn(self)]

    def _get_train_description(self, current_epoch: int) -> str:
        total = f"/{self.trainer.max_epochs}" if self.trainer.max_epochs and self.trainer.max_epochs > 0 else ""
        return f"epoch {current_epoch + 1}{total}".ljust(len(self.validation_description))  # 1-based, as EpochLines

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the MLflow run id's tail: noise next to the metrics
        return items

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.clock.begin(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self.clock.step(batch)
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if (batch_idx + 1) % self.metrics_every == 0:  # the only per-step metric read: every N steps
            self._update_metrics(trainer, pl_module)


class EpochLines(Callback):
    """One compact line per epoch on stderr when there is no terminal to draw a bar on:
    `epoch 3/10  train/loss=0.412  val/acc=0.931  35.2 steps/s  2,250 samples/s  ETA 0:00:12`."""

    def __init__(self, min_interval: float = 2.0, stream=None):
        self.min_interval = min_interval
        self.stream = stream
        self.clock = FitClock()
        self._last_print = -math.inf

    def on_train_start(self, trainer, pl_module):
        self.clock.begin(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.step(batch)  # shapes and counters only

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
        now = time.monotonic()
        if not last and now - self._last_print < self.min_interval:
            return
        self._last_print = now
        print(self.line(trainer), file=self.stream or sys.stderr, flush=True)

    def line(self, trainer) -> str:
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}"]
        found = trainer.callback_metrics  # one read per epoch
        train_loss = found.get("train/loss_epoch", found.get("train/loss"))
        shown = {"train/loss": train_loss} if train_loss is not None else {}
        shown.update({k: v for k, v in trainer.progress_bar_metrics.items() if k != "v_num"})
        for k, v in shown.items():
            try:
                parts.append(f"{k}={float(v):.4g}")
            except (TypeError, ValueError):
                continue
        steps, samples = self.clock.rates()
        if steps:
            parts.append(f"{steps:.1f} steps/s")
        if samples:
            parts.append(f"{samples:,.0f} samples/s")
        eta = self.clock.eta(trainer)
        if eta is not None and eta > 0:
            parts.append(f"ETA {fmt_duration(eta)}")
        return "  ".join(parts)


def progress_callbacks(enabled: bool, terminal: bool, metrics_every: int = 50) -> list[Callback]:
    """The progress display of one run: a bar on a terminal, epoch lines elsewhere, none if disabled."""
    if not enabled:
        return []
    return [LitlabProgressBar(metrics_every=metrics_every)] if terminal else [EpochLines()]


def has_bar(callbacks: list) -> bool:
    return any(isinstance(c, ProgressBar) for c in callbacks)
