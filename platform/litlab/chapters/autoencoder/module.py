"""Chapter 7 LightningModules: the registered `autoencoder` (deterministic) and `vae` (Gaussian
encoder, reparameterisation trick, closed-form KL; `beta` != 1 makes it a beta-VAE).

Both read images in [0, 1] (digits with data.normalize=false) and use the same likelihood options:
bernoulli (BCE) or gaussian (MSE / 2 sigma^2 + const), -log p(x|z) summed over pixels, in nats per image.

Metrics ({stage} = train, val, test; per image, averaged over the split):
    {stage}/loss   what is minimised: recon (autoencoder) or recon + beta * kl (VAE)
    {stage}/recon  -E_q[log p(x|z)] (autoencoder: -log p(x|z) at z = enc(x))
    {stage}/mse    mean squared pixel error of the mean reconstruction sigmoid(logits)
    {stage}/kl     KL(q(z|x) || p(z)) (VAE)
    {stage}/elbo   recon and KL with beta = 1: E_q[log p(x|z)] - KL <= log p(x) (VAE; one z sample)
    val/active_units  latent dims u with Var_x(E_q[z_u|x]) > 0.01 (Burda et al. 2016) (VAE)
    {val,test}/fid, {val,test}/sample_confidence  num_quality_samples decoded prior samples vs the
        split's real images (litlab.quality: Frechet distance on the digits classifier's features,
        mean max softmax). The autoencoder has no prior: its samples decode z ~ N(m, S), the Gaussian
        fitted to the val codes (re-fitted each validation).
Figures every `plot_every_n_epochs` epochs and at the end of fit: plots/reconstructions_epoch_N.png,
samples_epoch_N.png, traversal_epoch_N.png, latent_epoch_N.png (see module docstrings below).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from litlab.chapters.autoencoder import figures
from litlab.chapters.autoencoder.nets import (
    GaussianVAE,
    build_decoder,
    build_encoder,
    conv_grid,
    gaussian_kl,
    mean_image,
    neg_log_likelihood,
)
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import StageSteps

CHAPTER = "7 Autoencoders"

Side = Annotated[int, Range(ge=1, le=100_000)]
ImageShape = tuple[Side, Side, Side]  # (C, H, W)
LatentDim = Annotated[int, Range(ge=1, le=4096)]
Widths = list[Annotated[int, Range(ge=1, le=65_536)]]
Arch = Literal["mlp", "conv"]
LikelihoodArg = Literal["bernoulli", "gaussian"]
Sigma = Annotated[float, Range(gt=0, le=10)]
PlotEvery = Annotated[int, Range(ge=1, le=1_000_000)]
NumSamples = Annotated[int, Range(ge=0, le=100_000)]

_SAMPLE_SEED = 1234  # the quality samples and sample grids use fixed noise: comparable across epochs
_TRAVERSAL_DIMS, _TRAVERSAL_STEPS, _RECON_N = 8, 9, 12


class AutoencoderModule(StageSteps):
    """What both models share: steps, metrics, sample quality and figures. Subclasses implement
    `terms(x)`, `decode(z)`, `sample_latent(n, generator)` and `traversal(codes)`, and register the
    (encoder, decoder) pair that `__init__` leaves in `self._networks`."""

    def __init__(self, input_shape, latent_dim, arch, hidden, channels, likelihood, gaussian_sigma,
                 plot_every_n_epochs, num_quality_samples, out_dim: int):
        super().__init__()
        if arch == "conv":
            try:
                conv_grid(tuple(input_shape), list(channels))
            except ValueError as e:
                raise ConfigError("model.channels", f"{e}; use fewer levels or set data.image_size") from None
        if arch == "conv" and not channels:
            raise ConfigError("model.channels", "the conv encoder needs at least one level, e.g. [32, 64]")
        self._networks = (build_encoder(arch, tuple(input_shape), list(hidden), list(channels), out_dim),
                          build_decoder(arch, tuple(input_shape), list(hidden), list(channels), latent_dim))
        self._val: dict[str, list[Tensor]] = {}
        self._test_images: list[Tensor] = []
        self._plotted_epoch = -1

    # ---------------------------------------------------------------- to implement
    def terms(self, x: Tensor) -> dict[str, Tensor]:
        """-> loss (scalar), recon (B,), logits (B, C, H, W), codes (B, latent), optionally kl (B,)."""
        raise NotImplementedError

    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def traversal(self, codes: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """(center (latent,), scale (latent,), dims to show) from the val codes (N, latent)."""
        raise NotImplementedError

    def on_val_codes(self, codes: Tensor) -> None:
        """Hook: the codes of the whole val split, at each validation epoch end."""

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent) -> E[x|z] (B, C, H, W) in [0, 1]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(dm, "normalize", False):
            raise ConfigError("data.normalize", "autoencoders model pixels in [0, 1] (Bernoulli or sigmoid mean): "
                                                "set data.normalize=false")

    def _step(self, batch, stage: str) -> Tensor:
        x, y = batch
        t = self.terms(x)
        train = stage == "train"
        self.log(f"{stage}/loss", t["loss"].detach(), on_step=train, on_epoch=True, prog_bar=True, sync_dist=not train)
        values = {"recon": t["recon"].mean(), "mse": (mean_image(t["logits"]) - x).pow(2).mean()}
        if "kl" in t:
            values["kl"] = t["kl"].mean()
            values["elbo"] = -(t["recon"] + t["kl"]).mean()
        for name, v in values.items():
            self.log(f"{stage}/{name}", v.detach(), on_step=False, on_epoch=True, sync_dist=not train)
        if stage == "val":
            for key, v in (("x", x), ("y", y), ("codes", t["codes"])):
                self._val.setdefault(key, []).append(v.detach())
        elif stage == "test":
            self._test_images.append(x.detach())
        return t["loss"]

    # ---------------------------------------------------------------- epoch ends
    def _gather(self, t: Tensor) -> Tensor:
        if self.trainer.world_size > 1:
            t = self.all_gather(t).flatten(0, 1)  # (world, N, ...) -> (world * N, ...)
        return t

    def on_validation_epoch_start(self):
        self._val = {}

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not self._val:
            return
        codes = self._gather(torch.cat(self._val["codes"]))  # (N_val, latent)
        self.on_val_codes(codes)
        self._log_quality("val", torch.cat(self._val["x"]))
        epoch = self.trainer.current_epoch + 1  # epochs done
        if epoch % self.hparams.plot_every_n_epochs == 0:
            self._log_figures(epoch)

    def on_test_epoch_start(self):
        self._test_images = []

    def on_test_epoch_end(self):
        if self._test_images:
            self._log_quality("test", torch.cat(self._test_images))

    def on_fit_end(self):
        epoch = self.trainer.current_epoch  # after fit: the number of epochs run
        if epoch > 0 and epoch != self._plotted_epoch and self._val:
            self._log_figures(epoch)

    # ---------------------------------------------------------------- quality and figures
    @torch.no_grad()
    def samples(self, n: int) -> Tensor:
        """n images decoded from the prior (autoencoder: the fitted Gaussian), fixed noise: (n, C, H, W)."""
        g = torch.Generator().manual_seed(_SAMPLE_SEED)
        return self.decode(self.sample_latent(n, g).to(self.device))

    def _log_quality(self, stage: str, real: Tensor) -> None:
        n = self.hparams.num_quality_samples
        if n < 2 or real.shape[1] != 1:  # the digits classifier reads grey images only
            return
        from litlab import quality

        real = self._gather(real)
        if len(real) < 2:
            return
        quality.log_quality(self, self.samples(n), prefix=stage, real=real)

    def _has_figure_logger(self) -> bool:
        return self.trainer.is_global_zero and any(hasattr(lg, "log_figure") for lg in self.loggers)

    @torch.no_grad()
    def _log_figures(self, epoch: int) -> None:
        self._plotted_epoch = epoch
        if not self._has_figure_logger():
            return
        import matplotlib.pyplot as plt

        x, y = torch.cat(self._val["x"]), torch.cat(self._val["y"])
        codes = torch.cat(self._val["codes"])
        center, scale, dims = self.traversal(codes)
        steps = _TRAVERSAL_STEPS
        kind = type(self).__name__
        figs = {
            "reconstructions": figures.reconstruction_figure(
                x[:_RECON_N], self(x[:_RECON_N]), f"{kind} reconstructions (val), epoch {epoch}"),
            "samples": figures.image_grid(self.samples(64), title=f"{kind} samples from the prior, epoch {epoch}"),
            "traversal": figures.traversal_figure(
                self.decode(figures.traversal_codes(center, scale, dims, steps)), dims, steps,
                f"latent traversals (each row: one z_i over +-2.5 sd), epoch {epoch}"),
            "latent": figures.latent_scatter_figure(codes, y, f"{kind} latent codes of the val digits, epoch {epoch}"),
        }
        for name, fig in figs.items():
            self.log_figure(fig, f"plots/{name}_epoch_{epoch}.png")
            plt.close(fig)


def _top_dims(codes: Tensor) -> list[int]:
    """The (up to 8) latent dims whose codes vary most over the val set, in dim order."""
    k = min(_TRAVERSAL_DIMS, codes.shape[1])
    return sorted(codes.var(0).topk(k).indices.tolist()) if len(codes) > 1 else list(range(k))


@register_model(
    "autoencoder",
    chapter=CHAPTER,
    description="Deterministic autoencoder (MLP or conv), Bernoulli/Gaussian reconstruction loss; samples from "
                "a Gaussian fitted to the codes",
    smoke={"model": {"latent_dim": 2, "hidden": [16], "num_quality_samples": 16},
           "data": {"name": "digits", "normalize": False, "batch_size": 8}},
)
class Autoencoder(AutoencoderModule):
    """x -> z = enc(x) -> logits = dec(z); loss = -log p(x | z) (BCE or scaled MSE). No prior: to
    sample (and to score samples) it fits N(m, S) to the val codes at each validation and decodes
    z ~ N(m, S), which shows what a VAE's KL term buys (holes between the codes decode to non-digits)."""

    def __init__(
        self,
        input_shape: ImageShape,
        latent_dim: LatentDim = 8,
        arch: Arch = "mlp",
        hidden: Widths = [256, 128],  # noqa: B006 (schema default, never mutated) MLP widths, encoder order
        channels: Widths = [32, 64],  # noqa: B006 conv: channels of the stride-2 levels
        likelihood: LikelihoodArg = "gaussian",  # bernoulli: weak on grey levels, see the YAMLs
        gaussian_sigma: Sigma = 0.1,  # the fixed sd of the gaussian likelihood
        plot_every_n_epochs: PlotEvery = 10,
        num_quality_samples: NumSamples = 500,  # samples for {val,test}/fid and sample_confidence (0: none)
    ):
        super().__init__(input_shape, latent_dim, arch, hidden, channels, likelihood, gaussian_sigma,
                         plot_every_n_epochs, num_quality_samples, out_dim=latent_dim)
        self.save_hyperparameters()
        self.encoder, self.decoder = self._networks
        del self._networks
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_tril", torch.eye(latent_dim))  # Cholesky factor of the codes' covariance

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        z = self.encoder(x)  # (B, latent)
        logits = self.decoder(z)  # (B, C, H, W)
        nll = neg_log_likelihood(logits, x, self.hparams.likelihood, self.hparams.gaussian_sigma)  # (B,)
        return {"loss": nll.mean(), "recon": nll, "logits": logits, "codes": z}

    def decode(self, z: Tensor) -> Tensor:
        return mean_image(self.decoder(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encoder(x))  # the reconstruction E[x|z], (B, C, H, W)

    def on_val_codes(self, codes: Tensor) -> None:
        if len(codes) < 2:
            return
        cov = torch.cov(codes.T.double()).reshape(codes.shape[1], codes.shape[1])  # (latent, latent)
        cov = cov + 1e-6 * (1 + cov.diagonal().mean()) * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.code_mean.copy_(codes.mean(0))
        self.code_tril.copy_(torch.linalg.cholesky(cov).float())

    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        eps = torch.randn(n, self.hparams.latent_dim, generator=generator)  # (n, latent)
        return self.code_mean.cpu() + eps @ self.code_tril.cpu().T  # z ~ N(m, L L^T)

    def traversal(self, codes: Tensor):
        return self.code_mean, self.code_tril.pow(2).sum(1).sqrt(), _top_dims(codes)  # sd_i = ||L_i||


@register_model(
    "vae",
    chapter=CHAPTER,
    description="Variational autoencoder (Kingma & Welling 2014): Gaussian encoder, reparameterisation, "
                "closed-form KL; beta-VAE via beta",
    smoke={"model": {"latent_dim": 2, "hidden": [16], "num_quality_samples": 16},
           "data": {"name": "digits", "normalize": False, "batch_size": 8}},
)
class VAE(AutoencoderModule):
    """q(z|x) = N(mu(x), diag sigma^2(x)), z = mu + sigma * eps, p(z) = N(0, I), p(x|z) from the
    decoder. Minimises -ELBO_beta = E_q[-log p(x|z)] + beta * KL(q(z|x) || p(z)) (beta = 1: the
    VAE; beta > 1: beta-VAE, Higgins et al. 2017, a stronger pull to the prior: fewer active units,
    blurrier reconstructions, more prior-like codes). Reconstructions in the figures decode z = mu.
    `importance_log_likelihood(x, k)` estimates log p(x) (IWAE, k samples)."""

    def __init__(
        self,
        input_shape: ImageShape,
        latent_dim: LatentDim = 8,
        arch: Arch = "mlp",
        hidden: Widths = [256, 128],  # noqa: B006 (schema default, never mutated) MLP widths, encoder order
        channels: Widths = [32, 64],  # noqa: B006 conv: channels of the stride-2 levels
        likelihood: LikelihoodArg = "gaussian",  # bernoulli: weak on grey levels, see the YAMLs
        gaussian_sigma: Sigma = 0.1,  # the fixed sd of the gaussian likelihood
        beta: Annotated[float, Range(ge=0, le=1000)] = 1.0,  # weight of the KL term in the loss (not in elbo)
        plot_every_n_epochs: PlotEvery = 10,
        num_quality_samples: NumSamples = 500,  # samples for {val,test}/fid and sample_confidence (0: none)
    ):
        super().__init__(input_shape, latent_dim, arch, hidden, channels, likelihood, gaussian_sigma,
                         plot_every_n_epochs, num_quality_samples, out_dim=2 * latent_dim)
        self.save_hyperparameters()
        self.vae = GaussianVAE(*self._networks, latent_dim)
        del self._networks

    def terms(self, x: Tensor) -> dict[str, Tensor]:
        logits, _z, mu, logvar = self.vae(x)  # (B, C, H, W), (B, latent) x 3
        nll = neg_log_likelihood(logits, x, self.hparams.likelihood, self.hparams.gaussian_sigma)  # (B,)
        kl = gaussian_kl(mu, logvar)  # (B,)
        return {"loss": (nll + self.hparams.beta * kl).mean(), "recon": nll, "kl": kl, "logits": logits, "codes": mu}

    def decode(self, z: Tensor) -> Tensor:
        return mean_image(self.vae.decoder(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.vae.encode(x)[0])  # reconstruction from z = mu, (B, C, H, W)

    def importance_log_likelihood(self, x: Tensor, k: int = 100) -> Tensor:
        return self.vae.importance_log_likelihood(x, self.hparams.likelihood, self.hparams.gaussian_sigma, k)

    def on_val_codes(self, codes: Tensor) -> None:
        if len(codes) > 1:  # Var over x of E_q[z|x] = mu(x), per dim
            self.log("val/active_units", (codes.var(0) > 0.01).sum().float(), on_step=False, on_epoch=True)

    def sample_latent(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.hparams.latent_dim, generator=generator)  # z ~ p(z) = N(0, I)

    def traversal(self, codes: Tensor):
        ones = torch.ones(self.hparams.latent_dim, device=self.device)
        return torch.zeros_like(ones), ones, _top_dims(codes)  # around the prior mean, +-2.5 prior sd
