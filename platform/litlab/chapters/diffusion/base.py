"""What the DDPM and NCSN LightningModules share: data scaling, the EMA and its checkpointing,
seeded val/test losses, sample grids, the denoising-trajectory figure, and test-time sample quality.

A subclass implements
    loss(x (B, C, H, W) in [-1, 1], y (B,), generator) -> scalar training loss
    sample(n, labels, generator, trajectory, **sampler options) -> images (n, C, H, W) in [-1, 1]
and `default_labels(n)` if it is class-conditional.

Metrics: train/loss (step + epoch), val/loss and test/loss (the same loss with the EMA weights and a
fixed generator per batch, so epochs compare), test/fid (Frechet distance of `num_eval_samples` EMA
samples to the 270 real test digits, litlab.quality) and test/sample_confidence (mean max softmax of
the digits classifier; 0.1 = chance).
Figures: plots/samples_epoch{N}.png every `sample_every_n_epochs` epochs (a cheap sampler, see
_progress_options), plots/samples_final.png and plots/trajectory.png (x_T ... x_0) at the end of fit
with the configured sampler, all with the EMA weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from litlab.chapters.diffusion.ema import EMA
from litlab.errors import ConfigError
from litlab.module import LitlabModule


def to_model_space(x01: Tensor) -> Tensor:
    return x01 * 2 - 1  # pixels [0, 1] -> [-1, 1], the range the noise schedules assume


def to_pixels(x: Tensor) -> Tensor:
    return ((x + 1) / 2).clamp(0, 1)


class DiffusionBase(LitlabModule):
    net: nn.Module
    conditional: bool = False

    def __init__(self, ema_decay: float, sample_every_n_epochs: int, num_eval_samples: int, sample_seed: int):
        super().__init__()
        self.ema_decay = ema_decay
        self.sample_every_n_epochs = sample_every_n_epochs
        self.num_eval_samples = num_eval_samples
        self.sample_seed = sample_seed
        self.ema: EMA | None = None  # built after the subclass has made self.net (init_ema)
        self._ema_step = -1
        self._range_checked = False

    def init_ema(self) -> None:
        self.ema = EMA(self.net, self.ema_decay)

    # ------------------------------------------------------------ to implement
    def loss(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None,
               trajectory: list | None = None, **options) -> Tensor:
        raise NotImplementedError

    def default_labels(self, n: int) -> Tensor | None:
        """Classes to ask a conditional model for: 0, 1, ..., 9, 0, 1, ... (None: unconditional)."""
        return None

    # ------------------------------------------------------------ steps
    def _prepare(self, batch) -> tuple[Tensor, Tensor]:
        x, y = batch
        if not self._range_checked:  # once: one host sync
            lo, hi = x.min().item(), x.max().item()
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ConfigError("data.normalize", f"diffusion models expect pixels in [0, 1], got [{lo:.2f}, "
                                  f"{hi:.2f}]: set data.normalize=false")
            self._range_checked = True
        return to_model_space(x), y

    def training_step(self, batch, batch_idx):
        x, y = self._prepare(batch)
        loss = self.loss(x, y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        x, y = self._prepare(batch)
        gen = torch.Generator(device=x.device).manual_seed(1000 + batch_idx)  # same t and noise every epoch
        with self.ema.applied_to(self.net):
            loss = self.loss(x, y, generator=gen)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    # ------------------------------------------------------------ EMA
    def on_train_start(self):
        self._ema_step = self.trainer.global_step  # (also after a resume)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step != self._ema_step:  # after each optimizer step (not each accumulated batch)
            self.ema.update(self.net)
            self._ema_step = self.trainer.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    @torch.no_grad()
    def generate(self, n: int, labels: Tensor | None = None, seed: int | None = None, trajectory: list | None = None,
                 **options) -> Tensor:
        """n samples with the EMA weights, as pixels in [0, 1] (n, C, H, W); seeded, on this module's device."""
        gen = torch.Generator(device=self.device).manual_seed(self.sample_seed if seed is None else seed)
        was_training = self.net.training
        self.net.eval()
        try:
            with self.ema.applied_to(self.net):
                x = self.sample(n, labels, gen, trajectory, **options)
        finally:
            self.net.train(was_training)
        return to_pixels(x)

    # ------------------------------------------------------------ figures
    def _is_fast_dev_run(self) -> bool:
        return bool(self._trainer is not None and self.trainer.fast_dev_run)

    def _can_log_files(self) -> bool:
        return self.trainer.is_global_zero and any(hasattr(lg, "log_figure") for lg in self.loggers)

    def _quick_options(self) -> dict:
        """Sampler options that make a fast_dev_run (or a smoke test) cheap; {} otherwise."""
        return {}

    def _progress_options(self) -> dict:
        """Sampler options of the grids logged during training (cheap: progress, not the final quality)."""
        return {}

    def sample_grid(self, n: int = 64, title: str = "", **options):
        from litlab.plots import image_grid
        from litlab.quality import classifier_probs

        labels = self.default_labels(n)
        images = self.generate(n, labels, **options).cpu()
        if labels is not None:
            names = [f"asked {int(c)}" for c in labels]
        else:
            probs = classifier_probs(images)
            names = [f"{int(k)} ({p:.2f})" for p, k in zip(*probs.max(-1))]  # what the classifier reads, how sure
        return image_grid(images, title=title, nrow=int(n ** 0.5), labels=names)

    def trajectory_figure(self, n: int = 8, columns: int = 10, **options):
        """Rows: n samples; columns: x_T ... x_0 at `columns` evenly spaced points of the sampling chain."""
        from litlab.plots import image_grid

        traj: list = []
        self.generate(n, self.default_labels(n), trajectory=traj, **options)
        keep = sorted({round(i * (len(traj) - 1) / (columns - 1)) for i in range(columns)})
        frames = [traj[i] for i in keep]  # [(time label, (n, C, H, W))]
        images = torch.stack([to_pixels(x) for _, x in frames], dim=1).flatten(0, 1)  # (n * K, C, H, W), sample-major
        labels = [f"{self.trajectory_label(t)}" if j == 0 else "" for j in range(n) for t, _ in frames]
        return image_grid(images, title=f"{type(self).__name__}: sampling trajectory, noise -> data",
                          nrow=n, labels=labels)

    def trajectory_label(self, t: int) -> str:
        return f"t={t}"

    def on_train_epoch_end(self):
        epoch = self.current_epoch + 1
        if epoch % self.sample_every_n_epochs == 0 and not self._is_fast_dev_run() and self._can_log_files():
            fig = self.sample_grid(64, f"EMA samples after epoch {epoch}", **self._progress_options())
            self.log_figure(fig, f"plots/samples_epoch{epoch}.png")

    def on_fit_end(self):
        if self._can_log_files():
            opts = self._quick_options()
            self.log_figure(self.sample_grid(64, "EMA samples, end of training", **opts), "plots/samples_final.png")
            self.log_figure(self.trajectory_figure(**opts), "plots/trajectory.png")

    # ------------------------------------------------------------ test-time quality
    def setup(self, stage: str) -> None:
        if stage == "test":  # load (or train, once per machine) the digits classifier now: the test
            from litlab import quality  # loop runs in inference mode, where it could not be trained

            quality.digits_classifier()

    def on_test_epoch_end(self):
        from litlab import quality

        n = min(self.num_eval_samples, 20) if self._is_fast_dev_run() else self.num_eval_samples
        opts = self._quick_options()
        labels = self.default_labels(n)
        images = self.generate(n, labels, **opts)
        self._log_test("test/fid", quality.frechet_distance(images))
        self._log_test("test/sample_confidence", quality.confidence(images))
        self.extra_test_metrics(images, labels, opts)
        if self.trainer.is_global_zero:
            self.quality_tables()

    def _log_test(self, name: str, value: float) -> None:
        self.log(name, float(value), on_step=False, on_epoch=True, sync_dist=False)

    def extra_test_metrics(self, images: Tensor, labels: Tensor | None, options: dict) -> None:
        """Conditional models: class accuracy (guided and not)."""

    def quality_tables(self) -> None:
        """Tables of sample quality against sampler settings, when the config asks for them."""
