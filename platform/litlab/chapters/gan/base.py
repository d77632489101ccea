"""`AdversarialModule`: what every GAN of the chapter shares.

* Manual optimisation (`automatic_optimization = False`): a GAN alternates two (or more) optimisers
  on opposite objectives; `training_step` calls `self.optimizers()`, `self.manual_backward(loss)` and
  `opt.step()` itself, so a discriminator can take n_critic steps per generator step.
* One optimiser per network, each built by litlab.optim.build_optimizer from the config's `optim:`
  section (name, betas, momentum, alpha, eps, weight_decay), with a per-network learning rate from
  the model args `lr_g` / `lr_d` (None: optim.lr). An `optim.scheduler` gives each optimiser its own
  LambdaLR, stepped once per training batch (manual optimisation steps nothing by itself).
* Pixels: the data gives images in [0, 1] (digits with data.normalize=false); the networks work in
  [-1, 1] (tanh output): `to_model(x) = 2x - 1`, `to_pixels(g) = (g + 1) / 2`.
* Figures: `sample_figure()` every `plot_every_n_epochs` epochs and at the end of fit, stored as
  plots/samples_epoch_N.png.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from litlab.errors import ConfigError
from litlab.module import LitlabModule


class AdversarialModule(LitlabModule):
    plot_every_n_epochs: int = 5

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self._plotted_epoch = -1

    # ---------------------------------------------------------------- to implement
    def optimised_networks(self) -> list[tuple[str, nn.Module, float | None]]:
        """[(name, module, lr or None)] in the order of self.optimizers(), e.g. generator first."""
        raise NotImplementedError

    def sample_figure(self, epoch: int):
        """A matplotlib Figure of samples after `epoch` epochs (called in eval mode, without gradients)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- optimisers
    def configure_optimizers(self):
        from litlab.config import OptimConfig
        from litlab.optim import build_optimizer, build_scheduler

        cfg = self.optim_config or OptimConfig()
        out = []
        for name, module, lr in self.optimised_networks():
            opt = build_optimizer(module, dataclasses.replace(cfg, lr=lr if lr is not None else cfg.lr))
            sched = build_scheduler(opt, cfg.scheduler, total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
                                    max_epochs=max(1, int(self.trainer.max_epochs or 1)))
            out.append({"optimizer": opt} if sched is None else
                       {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": f"lr-{name}"}})
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx):
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for s in schedulers if isinstance(schedulers, list) else [schedulers]:
            s.step()

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(dm, "normalize", False):
            raise ConfigError("data.normalize", "the GAN modules need pixels in [0, 1] (tanh generators): set "
                                                "data.normalize=false")

    # ---------------------------------------------------------------- pixels
    @staticmethod
    def to_model(x: Tensor) -> Tensor:
        return x * 2 - 1  # [0, 1] -> [-1, 1]

    @staticmethod
    def to_pixels(g: Tensor) -> Tensor:
        return ((g + 1) / 2).clamp(0, 1)

    # ---------------------------------------------------------------- figures
    def _has_figure_logger(self) -> bool:
        return self.trainer.is_global_zero and any(hasattr(lg, "log_figure") for lg in self.loggers)

    def _log_samples(self, epoch: int) -> None:
        if not self._has_figure_logger():
            return
        was_training = self.training
        self.eval()
        with torch.no_grad():
            fig = self.sample_figure(epoch)
        self.train(was_training)
        if fig is None:  # nothing to show yet (e.g. no validation batch seen)
            return
        self.log_figure(fig, f"plots/samples_epoch_{epoch}.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self._plotted_epoch = epoch

    def on_train_epoch_end(self):
        epoch = self.trainer.current_epoch + 1  # epochs done
        if epoch % self.plot_every_n_epochs == 0:
            self._log_samples(epoch)

    def on_fit_end(self):
        epoch = self.trainer.current_epoch  # after fit, the count of epochs run
        if epoch != self._plotted_epoch and epoch > 0:
            self._log_samples(epoch)

    # ---------------------------------------------------------------- helpers for subclasses
    def log_train(self, **values: Tensor) -> None:
        for k, v in values.items():
            self.log(f"train/{k}", v.detach(), on_step=True, on_epoch=True, prog_bar=k in ("d_loss", "g_loss"))
