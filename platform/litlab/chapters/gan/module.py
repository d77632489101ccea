"""Chapter 8 LightningModules on images of digits: `gan` (DCGAN, non-saturating or minimax generator
loss), `wgan` (critic with weight clipping or gradient penalty, n_critic critic steps per generator
step) and `cgan` (class-conditional: label embedding into G, projection discriminator).

One training batch = one discriminator (critic) step on the real batch and as many fakes; every
n_critic-th batch also one generator step (fresh z). Logged per step and epoch: train/d_loss,
train/g_loss, and train/d_acc (GAN) or train/wasserstein = E f(x) - E f(G(z)) and train/gp (WGAN).
Every epoch: val/fid, the Frechet distance between the digits classifier's features of as many
samples as validation images and those images (litlab.quality). At test: test/fid, test/confidence
(mean max class probability of samples), and for `cgan` test/class_accuracy (samples of class k
read as k by the classifier). Samples of a fixed noise batch: plots/samples_epoch_N.png.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from litlab.chapters.gan import losses
from litlab.chapters.gan.base import AdversarialModule
from litlab.chapters.gan.nets import DCDiscriminator, DCGenerator, Norm, doublings
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "8 Generative adversarial networks"

Side = Annotated[int, Range(ge=1, le=100_000)]
ImageShape = tuple[Side, Side, Side]  # (C, H, W)
Width = Annotated[int, Range(ge=1, le=4096)]
ZDim = Annotated[int, Range(ge=1, le=4096)]
LR = Annotated[float, Range(gt=0, le=10)] | None  # None: optim.lr
NCritic = Annotated[int, Range(ge=1, le=100)]
PlotEvery = Annotated[int, Range(ge=1)]
_EVAL_SEED = 1234  # noise for val/test samples: the same z every epoch, independent of the run's RNG


class NoiseGAN(AdversarialModule):
    """Shared by gan/wgan/cgan: G(z [, y]) and D(x [, y]) on (C, S, S) images."""

    def __init__(self, input_shape, z_dim: int, g_width: int, d_width: int, d_norm: str, spectral_norm: bool,
                 n_critic: int, lr_g: float | None, lr_d: float | None, plot_every_n_epochs: int,
                 num_classes: int = 0, embed_dim: int = 16):
        super().__init__()
        c, h, w = input_shape
        if h != w:
            raise ConfigError("model.input_shape", f"square images only, got {h}x{w}")
        try:
            doublings(h)
        except ValueError as e:
            raise ConfigError("model.input_shape", f"{e} (set data.image_size)") from None
        self.z_dim, self.num_classes, self.n_critic = z_dim, num_classes, n_critic
        self.lr_g, self.lr_d = lr_g, lr_d
        self.plot_every_n_epochs = plot_every_n_epochs
        self.generator = DCGenerator(z_dim, c, h, g_width, num_classes, embed_dim)
        self.discriminator = DCDiscriminator(c, h, d_width, d_norm, spectral_norm, num_classes)
        g = torch.Generator().manual_seed(0)
        n_fixed = 8 * num_classes if num_classes else 64  # plots: 8 x 8, or 8 per class (one row each)
        self.register_buffer("fixed_z", torch.randn(n_fixed, z_dim, generator=g))  # the same z every time
        fixed_y = torch.arange(num_classes).repeat_interleave(8) if num_classes else torch.zeros(n_fixed, dtype=torch.long)
        self.register_buffer("fixed_y", fixed_y)
        self._eval_real: list[Tensor] = []
        self._eval_labels: list[Tensor] = []

    # ---------------------------------------------------------------- objectives (overridden)
    def d_objective(self, real: Tensor, fake: Tensor, y: Tensor | None, y_fake: Tensor | None) -> tuple[Tensor, dict]:
        real_logits, fake_logits = self.discriminator(real, y), self.discriminator(fake, y_fake)
        return losses.d_loss_bce(real_logits, fake_logits), {"d_acc": losses.d_accuracy(real_logits, fake_logits)}

    def g_objective(self, fake_scores: Tensor) -> Tensor:
        return losses.g_loss_nonsaturating(fake_scores)

    def after_d_step(self) -> None:
        pass

    # ---------------------------------------------------------------- sampling
    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.z_dim, generator=generator).to(self.device) if generator is not None \
            else torch.randn(n, self.z_dim, device=self.device)

    def random_labels(self, n: int) -> Tensor | None:
        return torch.randint(self.num_classes, (n,), device=self.device) if self.num_classes else None

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, seed: int | None = None) -> Tensor:
        """n images (n, C, S, S) in [0, 1] (class `labels[i]` for the conditional GAN), in eval mode."""
        was_training = self.training
        self.eval()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        y = None
        if self.num_classes:
            y = labels.to(self.device) if labels is not None else \
                torch.randint(self.num_classes, (n,), generator=gen).to(self.device)
        out = self.to_pixels(self.generator(self.noise(n, gen), y))
        self.train(was_training)
        return out

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.generator(z, y)  # (B, C, S, S) in [-1, 1]

    def smoke_forward(self, batch) -> Tensor:
        x, y = batch
        y = y if self.num_classes else None
        return self.discriminator(self.generator(self.noise(len(x)), y), y)  # D(G(z)): (B,)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x, y = batch
        real = self.to_model(x)  # (B, C, S, S) in [-1, 1]
        y = y if self.num_classes else None
        b = len(real)

        # Discriminator / critic step on a real batch and as many fakes (G's graph not needed).
        y_fake = self.random_labels(b)
        with torch.no_grad():
            fake = self.generator(self.noise(b), y_fake)
        d_loss, d_logs = self.d_objective(real, fake, y, y_fake)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        self.after_d_step()
        self.log_train(d_loss=d_loss, **d_logs)

        # Generator step every n_critic batches; D is frozen meanwhile (toggle_optimizer).
        if (batch_idx + 1) % self.n_critic == 0:
            self.toggle_optimizer(opt_g)
            y_fake = self.random_labels(b)
            g_loss = self.g_objective(self.discriminator(self.generator(self.noise(b), y_fake), y_fake))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
            self.log_train(g_loss=g_loss)

    def optimised_networks(self):
        return [("generator", self.generator, self.lr_g), ("discriminator", self.discriminator, self.lr_d)]

    # ---------------------------------------------------------------- evaluation
    def _collect(self, batch) -> None:
        x, y = batch
        self._eval_real.append(x.detach())
        self._eval_labels.append(y.detach())

    def validation_step(self, batch, batch_idx):
        self._collect(batch)

    def test_step(self, batch, batch_idx):
        self._collect(batch)

    def _evaluate(self, stage: str) -> None:
        from litlab import quality

        if not self._eval_real:
            return
        real, labels = torch.cat(self._eval_real), torch.cat(self._eval_labels)
        self._eval_real, self._eval_labels = [], []
        # As many samples as real images; the conditional GAN draws the real images' classes.
        fake = self.sample(len(real), labels if self.num_classes else None, seed=_EVAL_SEED)
        if fake.shape[1] != 1:  # the digits classifier reads grey images: colour ones (cifar10) by their mean
            fake, real = fake.mean(1, keepdim=True), real.mean(1, keepdim=True)
        values = {"fid": quality.frechet_distance(fake, real)}
        if stage == "test":
            values["confidence"] = quality.confidence(fake)
        if self.num_classes:
            values["class_accuracy"] = quality.class_accuracy(fake, labels)
        for k, v in values.items():
            self.log(f"{stage}/{k}", v, on_step=False, on_epoch=True, prog_bar=k == "fid", sync_dist=True)

    def on_validation_epoch_end(self):
        self._evaluate("val")

    def on_test_epoch_end(self):
        self._evaluate("test")

    def sample_figure(self, epoch: int):
        from litlab.plots import image_grid

        y = self.fixed_y if self.num_classes else None
        images = self.to_pixels(self.generator(self.fixed_z, y))
        title = f"{self.registry_name}: fixed z" + (", row k = class k" if self.num_classes else "")
        return image_grid(images, title=f"{title} (epoch {epoch})", nrow=self.num_classes or 8)


GAN_SMOKE = {"model": {"z_dim": 8, "g_width": 4, "d_width": 4},
             "data": {"name": "digits", "normalize": False, "batch_size": 8}}


@register_model("gan", chapter=CHAPTER,
                description="DCGAN on digits: conv G and D, non-saturating (or minimax) generator loss, optional "
                            "spectral norm; test/fid",
                smoke=GAN_SMOKE)
class GAN(NoiseGAN):
    def __init__(
        self,
        input_shape: ImageShape,
        z_dim: ZDim = 32,
        g_width: Width = 32,  # channels at full resolution, doubled at each halving
        d_width: Width = 32,
        d_norm: Norm = "batch",
        spectral_norm: bool = False,  # D's weights W / sigma_max(W)
        g_loss: Literal["nonsaturating", "minimax"] = "nonsaturating",
        n_critic: NCritic = 1,  # D steps per G step
        lr_g: LR = None,
        lr_d: LR = None,
        plot_every_n_epochs: PlotEvery = 5,
    ):
        super().__init__(input_shape, z_dim, g_width, d_width, d_norm, spectral_norm, n_critic, lr_g, lr_d,
                         plot_every_n_epochs)
        self.save_hyperparameters()
        self.g_loss_kind = g_loss

    def g_objective(self, fake_logits: Tensor) -> Tensor:
        if self.g_loss_kind == "minimax":
            return losses.g_loss_minimax(fake_logits)
        return losses.g_loss_nonsaturating(fake_logits)


@register_model("wgan", chapter=CHAPTER,
                description="Wasserstein GAN on digits: critic with weight clipping (RMSprop) or gradient penalty "
                            "(WGAN-GP), n_critic steps",
                smoke={"model": {"z_dim": 8, "g_width": 4, "d_width": 4, "n_critic": 1},
                       "data": {"name": "digits", "normalize": False, "batch_size": 8}})
class WGAN(NoiseGAN):
    def __init__(
        self,
        input_shape: ImageShape,
        penalty: Literal["gp", "clip"] = "gp",
        gp_weight: Annotated[float, Range(ge=0, le=1e6)] = 10.0,  # lambda of WGAN-GP
        clip_value: Annotated[float, Range(gt=0, le=100)] = 0.01,  # c of weight clipping
        z_dim: ZDim = 32,
        g_width: Width = 32,
        d_width: Width = 32,
        d_norm: Norm = "layer",  # never "batch" with gp: the penalty is per sample
        spectral_norm: bool = False,
        n_critic: NCritic = 5,
        lr_g: LR = None,
        lr_d: LR = None,
        plot_every_n_epochs: PlotEvery = 5,
    ):
        if penalty == "gp" and d_norm == "batch":
            raise ConfigError("model.d_norm", "batch norm mixes the samples of a batch, so the per-sample "
                                              "gradient penalty is no longer per sample: use layer or none")
        super().__init__(input_shape, z_dim, g_width, d_width, d_norm, spectral_norm, n_critic, lr_g, lr_d,
                         plot_every_n_epochs)
        self.save_hyperparameters()
        self.penalty, self.gp_weight, self.clip_value = penalty, gp_weight, clip_value

    def d_objective(self, real, fake, y, y_fake):
        real_s, fake_s = self.discriminator(real), self.discriminator(fake)
        loss = losses.critic_loss(real_s, fake_s)
        logs = {"wasserstein": -loss.detach()}
        if self.penalty == "gp":
            gp = losses.gradient_penalty(self.discriminator, real, fake, self.gp_weight)
            loss = loss + gp
            logs["gp"] = gp
        return loss, logs

    def g_objective(self, fake_scores: Tensor) -> Tensor:
        return losses.g_loss_wasserstein(fake_scores)

    def after_d_step(self) -> None:
        if self.penalty == "clip":
            losses.clip_weights(self.discriminator, self.clip_value)


@register_model("cgan", chapter=CHAPTER,
                description="class-conditional DCGAN on digits: label embedding into G, projection discriminator; "
                            "test/class_accuracy",
                smoke={"model": {"z_dim": 8, "g_width": 4, "d_width": 4},
                       "data": {"name": "digits", "normalize": False, "batch_size": 8}})
class ConditionalGAN(NoiseGAN):
    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: Annotated[int, Range(ge=2, le=100_000)],
        embed_dim: Annotated[int, Range(ge=1, le=4096)] = 16,  # G: z concatenated with e_y
        z_dim: ZDim = 32,
        g_width: Width = 32,
        d_width: Width = 32,
        d_norm: Norm = "batch",
        spectral_norm: bool = False,
        n_critic: NCritic = 1,
        lr_g: LR = None,
        lr_d: LR = None,
        plot_every_n_epochs: PlotEvery = 5,
    ):
        super().__init__(input_shape, z_dim, g_width, d_width, d_norm, spectral_norm, n_critic, lr_g, lr_d,
                         plot_every_n_epochs, num_classes=num_classes, embed_dim=embed_dim)
        self.save_hyperparameters()
